"""bench.py's cheapest measurements at toy sizes, through the real code paths (model.STEM fed a StemRows, training
steps by train.train_step in a child process, OffloadedRowAdamW's counters), and its settings. What is checked could
be wrong: the model's FLOP accounting, that the printed tables hold what the JSON holds, the per-round ratios, the
byte counts; never the timings themselves."""

import importlib.util
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import figures
from configurator import ConfigError

HERE = Path(__file__).resolve().parent


def run(tmp_path, capsys, *args):
    """bench.main at toy sizes; checks that every table printed is the JSON's, cell for cell; returns the JSON."""
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: toy shapes gain nothing from two, and stall when other jobs share the cores
        results = bench.main(["--tiny=True", "--device=cpu", "--dtype=float32", "--threads=1", "--reps=2",
                              "--warmup=1", f"--json={out}", *args])
    finally:
        torch.set_num_threads(threads)  # as the rest of the test session had it
    printed, written = capsys.readouterr().out, json.loads(out.read_text())
    assert set(results) <= set(written)
    for name, res in results.items():
        table = printed.split(f"### {res['title']}\n")[1].split("\n\n")[0].strip()  # header, |---|, rows
        cells = [line[2:-2].split(" | ") for line in table.splitlines()[2:]]
        assert cells == [[bench.fmt(v) for v in row] for row in written[name]["rows"]], name
    return written


def test_ffn(tmp_path, capsys):
    res = run(tmp_path, capsys, "--what=ffn")["ffn"]
    rows = {row[0]: row for row in res["rows"]}
    assert set(rows) == {"swiglu", "stem", "moe"} and rows["stem"][1] == "torch"  # no Triton on a CPU
    assert all(r[2] > 0 and math.isfinite(r[2]) for r in rows.values())
    assert rows["stem"][4] == pytest.approx(2 / 3)  # GPT's accounting: W_gate and W_down of SwiGLU's three
    assert 1.0 < rows["moe"][4] < 1.05  # top-2 of 8 half-width experts = SwiGLU's FLOPs, plus the router


def test_step_through_train_step(tmp_path, capsys):
    """The step table from its raw per-round times, and training that really ran: a loss for every round
    (warm-up included), each a new step on new weights. (Mutations caught: a ratio taken of the medians instead
    of per round, or against the wrong variant; a timed function that does not step.)"""
    res = run(tmp_path, capsys, "--what=step")["step"]
    rows = {row[0]: row for row in res["rows"]}
    assert list(rows) == ["stem", "swiglu"]
    stem, swiglu = res["raw"]["stem@1024"], res["raw"]["swiglu@1024"]
    assert len(stem["times_ms"]) == 2  # one time per round
    per_round = [a / b for a, b in zip(stem["times_ms"], swiglu["times_ms"])]
    assert rows["stem"][4] == statistics.median(per_round) and rows["swiglu"][4] == 1.0
    assert rows["stem"][5] == f"{min(per_round):.2f}-{max(per_round):.2f}"
    assert rows["stem"][6] < 1.0  # STEM's layers drop W_up: fewer FLOPs per token than SwiGLU
    for raw in (stem, swiglu):  # warm-up + timed rounds, each train_step on the weights the last one left
        assert len(raw["losses"]) == 3 and len(set(raw["losses"])) == 3 and raw["loss"] == raw["losses"][-1]


def test_prepare_throughput(tmp_path, capsys):
    res = run(tmp_path, capsys, "--what=prepare")["prepare"]
    (one, w1, wn) = res["rows"]
    assert one[0].startswith("one tiktoken thread") and w1[0] == "prepare.py, workers=1"
    assert wn[0].startswith("prepare.py, workers=")
    mb = one[1] * one[2]  # s x MB/s: the same text for all three
    for name, s, mb_s, ratio, cpu_s in res["rows"]:
        assert s * mb_s == pytest.approx(mb) and ratio == pytest.approx(one[1] / s) and cpu_s > 0
    assert 0.5 < mb < 2  # tiny: ~1 MB of Shakespeare
    assert set(res["raw"]["seconds"]) == {r[0] for r in res["rows"]}


def test_capacity(tmp_path, capsys):
    rows = run(tmp_path, capsys, "--what=capacity")["capacity"]["rows"]
    contexts, distinct, stem_active = [r[0] for r in rows], [r[2] for r in rows], [r[5] for r in rows]
    assert contexts == sorted(contexts) and all(0 < d <= L for d, L in zip(distinct, contexts))
    assert distinct == sorted(distinct)  # a longer context touches more distinct rows...
    assert stem_active == sorted(stem_active)  # ...so more STEM parameters are active per sequence


def test_offload_byte_counts(tmp_path, capsys):
    m = run(tmp_path, capsys, "--what=offload")["offload"]["raw"]
    assert m["to_host"] == m["expected_to_host"]  # one merged gradient per distinct row, each step
    assert m["to_device"] == m["expected_to_device"]  # each batch's distinct rows once, plus the re-copied ones


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown key --nope"):
        bench.parse_settings(["--nope=1"])
    with pytest.raises(ConfigError, match="reps must be an int"):
        bench.parse_settings(["--reps=many"])
    with pytest.raises(ConfigError, match="what must be all or one of"):
        bench.parse_settings(["--what=everything"])
    config = tmp_path / "quick.py"
    config.write_text("reps = 3\nwhat = 'gather'\n")
    settings = bench.parse_settings([str(config), "--what=sample"])  # a config file, then the command line wins
    assert (settings["reps"], settings["what"]) == (3, "sample")


def test_help_lists_keys_with_their_comments(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_settings(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "round-robin" in out  # the docstring, which says how timings are taken
    for key in bench.DEFAULTS:
        assert f"--{key}=" in out
    assert "timed rounds per measurement" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_gpu_check_without_cuda_is_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "bench.py"), "--what=gpu"], cwd=HERE, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("bench.py: error: --what=gpu needs a CUDA GPU") and proc.stderr.count("\n") == 1


GPU_CHECK_ON_CPU = r"""
import json, time, bench
bench.apply({**bench.DEFAULTS, "tiny": True, "device": "cpu", "dtype": "float32", "threads": 1, "reps": 2})
import inspect
assert inspect.isgenerator(bench.bench_gpu())  # each part is printed and saved as soon as it is done
for res in bench.bench_gpu():
    print("RESULT", json.dumps(res, default=str))
bench.gpu_budget_s = 0.0
print("SKIPPED", json.dumps([res["title"] for res in bench.bench_gpu()]))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_runs_on_a_cpu_under_the_interpreter():
    """bench.py --what=gpu's parts at toy sizes on a CPU (the Triton op under TRITON_INTERPRET=1; no compile):
    parity within tolerance and bit-identical reruns for fp32 and bf16 tables, the plan timed apart from the
    kernels; every training variant with the preset's bf16/rowwise table runs with no error but the dense offload,
    which needs a GPU; the torch path and the offloaded table give the first run's losses exactly; a zero budget
    skips every part. (Mutations caught: results held back to the end of the run, a loss difference taken
    against the wrong run, the budget ignored.)"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", GPU_CHECK_ON_CPU], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {r["name"]: r for r in (json.loads(l[7:]) for l in proc.stdout.splitlines() if l.startswith("RESULT "))}
    assert list(results) == ["gpu_parity", "gpu_kernel", "gpu_train"]
    parity = results["gpu_parity"]["rows"]
    assert {r[0] for r in parity} == {"fp32", "fp32 table, bf16 autocast", "bf16 table, bf16 autocast"}
    assert all(r[4] is True and r[5] is True for r in parity), parity  # within tolerance, bit-identical rerun
    assert "backward plan (once per forward)" in {r[1] for r in results["gpu_kernel"]["rows"]}
    res = results["gpu_train"]
    rows = {r[0]: dict(zip(res["columns"], r)) for r in res["rows"]}
    assert list(rows) == ["stem, triton", "stem, torch path", "swiglu", "stem offloaded", "stem, dense offload"]
    dense_offload = rows.pop("stem, dense offload")  # FSDP2's CPUOffloadPolicy needs a GPU: refused here
    assert "dense_offload=True keeps the dense weights in host memory" in dense_offload["ms/step"], dense_offload
    assert not [r for r in rows.values() if str(r["ms/step"]).startswith("failed")], rows
    assert any("bfloat16" in note and "rowwise" in note for note in res["notes"]), res["notes"]
    for name in ("stem, triton", "stem, torch path", "stem offloaded"):  # on a CPU all take the same torch path
        steps = len(res["raw"][name]["losses"])
        assert steps == 3 + 2 and rows[name]["identical losses"] == f"{steps} of {steps}", rows[name]
    assert rows["swiglu"]["identical losses"] is None  # no STEM table: its losses are its own
    skipped = json.loads(next(l[8:] for l in proc.stdout.splitlines() if l.startswith("SKIPPED ")))
    assert skipped == ["gpu: parity: skipped", "gpu: kernel: skipped", "gpu: train: skipped"]


def quality_log(path, val_losses, every=50):
    """A log.jsonl as train.py writes it: eval records (train_loss and val_loss) and step records (loss)."""
    path.mkdir(parents=True)
    lines = []
    for i, v in enumerate(val_losses):
        lines.append({"iter": i * every, "train_loss": v - 0.5, "val_loss": v})
        lines.append({"iter": i * every, "loss": v + 1.0, "lr": 1e-3, "dt_ms": 1.0})
    path.joinpath("log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def eval_json(path, losses, row):
    """eval.py's eval.json with the position part: one bucket of 16 positions per loss, distinct tokens growing."""
    position = [dict(start=16 * i, end=16 * i + 15, loss=loss, distinct_tokens=10.0 * (i + 1),
                     stem_params=10 * (i + 1) * row) for i, loss in enumerate(losses)]
    path.joinpath("eval.json").write_text(json.dumps(dict(data="data/shakespeare", val_tokens=1234, val_loss=6.0,
                                                          bpb=2.0, position=position)))


def figure_inputs(tmp_path):
    """The quality runs of two seeds (swiglu, stem, moe) and the first seed's eval.json files."""
    for seed, shift in (("7", 0.0), ("8", 0.1)):
        for ffn, base in (("swiglu", 7.0), ("stem", 6.5), ("moe", 6.8)):
            quality_log(tmp_path / f"q_s{seed}" / ffn, [10.0, base + 0.5 + shift, base + shift])
            if seed == "7":
                eval_json(tmp_path / f"q_s{seed}" / ffn, [base + 1, base, base - 0.5], 256 if ffn == "stem" else 0)
    return [f"--quality_out={tmp_path / 'q'}", "--seeds=7,8", f"--out_dir={tmp_path / 'docs'}"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is optional (pip install)")
def test_figures_from_the_runs_logs(tmp_path, capsys):
    """figures.py draws both PNGs from log.jsonl and eval.json files, and returns what it drew: the last
    validation loss of each FFN and seed, and the first and last position buckets. (Mutations caught: the train
    loss drawn for the validation loss, the second seed's runs read for the first's.)"""
    rows = {(r[0], r[1], r[2]): r[3:] for r in figures.main(figure_inputs(tmp_path))}
    for (ffn, base), (seed, shift) in itertools.product((("swiglu", 7.0), ("stem", 6.5), ("moe", 6.8)),
                                                        (("7", 0.0), ("8", 0.1))):
        assert rows[ffn, seed, "step 100"] == [pytest.approx(base + shift), None]
    assert rows["stem", "7", "positions 0-15"] == [7.5, 2560] and rows["stem", "7", "positions 32-47"] == [6.0, 7680]
    assert rows["moe", "7", "positions 32-47"] == [pytest.approx(6.3), 0]
    for name in ("quality_curves.png", "loss_by_position.png"):
        png = (tmp_path / "docs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "q_s8" / "moe" / "log.jsonl").unlink()  # a run not made yet: the command that makes it, in one line
    with pytest.raises(ConfigError, match=r"q_s8/moe/log.jsonl: make it with `python bench.py --what=quality "
                       r"--quality_variants=swiglu,stem,moe --quality_out=\S+/q_s8 --quality_extra=\"--seed=8\"`"):
        figures.main([f"--quality_out={tmp_path / 'q'}", "--seeds=7,8", f"--out_dir={tmp_path / 'docs'}"])
    (tmp_path / "q_s7" / "stem" / "eval.json").write_text(json.dumps({"bpb": 2.0}))  # eval.py run without position
    with pytest.raises(ConfigError, match=r"no loss by position in \S+/q_s7/stem/eval.json: make it with "
                       r"`python eval.py --out_dir=\S+/q_s7/stem --parts=position --max_tokens=0`"):
        figures.main([f"--quality_out={tmp_path / 'q'}", "--seeds=7", f"--out_dir={tmp_path / 'docs'}"])


def test_figures_without_matplotlib_is_one_line(tmp_path):
    """matplotlib is optional: without it figures.py says so in one line, naming the install, and exits 1."""
    (tmp_path / "matplotlib.py").write_text("raise ImportError('No module named matplotlib (a stand-in)')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "figures.py")], cwd=HERE, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("figures.py: error: figures.py draws") and "pip install matplotlib" in proc.stderr
