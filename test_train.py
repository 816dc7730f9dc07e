"""
train.py and sample.py end to end, as a user runs them: real subprocesses on a small slice of Shakespeare,
tiny models with the real GPT-2 vocabulary, a few steps each. Everything is written under pytest's tmp
folders, never data/ or out/.

Starting Python with torch costs seconds, so the runs that do not depend on each other start together (two
waves: everything that needs no checkpoint, then everything that starts from the base run's) and each test
waits for its own. Each process uses one thread, so they share the cores instead of fighting over them.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import train
from prepare import prepare, shakespeare_dir

HERE = Path(__file__).resolve().parent
TRAIN, SAMPLE = str(HERE / "train.py"), str(HERE / "sample.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# gradient_accumulation_steps=2, so that the DDP run can split the same global batch over 2 processes
TINY_CONFIG = """\
n_layer = 2
n_head = 2
n_embd = 32
d_ff = 64
block_size = 32
batch_size = 4
gradient_accumulation_steps = 2
eval_interval = 2
eval_iters = 2
log_interval = 1
learning_rate = 1e-2
min_lr = 1e-3
warmup_iters = 2
lr_decay_iters = 8
max_iters = 100  # overridden on the command line: checks that the command line wins
"""
N = 4  # steps of the base run; the resume test goes on to 2N
LEAN = ["--stem_dtype=bfloat16", "--stem_state=rowwise", "--stem_weight_decay=1.0"]  # the 4-byte table, with a decay
# strong enough (1% a step at lr 1e-2) that one step of it shows in a bf16 row (0.4% apart)


class Job:
    """A script run in the background; result() waits and returns (returncode, stdout, stderr)."""

    def __init__(self, *args, cwd, nice=0, env=None):
        self.cmd = [sys.executable, *map(str, args)]
        self.out, self.err = open(Path(cwd) / "stdout.txt", "w+"), open(Path(cwd) / "stderr.txt", "w+")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, stdout=self.out, stderr=self.err, env=env, text=True,
                                     preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def result(self, check=True):
        self.proc.wait(timeout=600)
        self.out.seek(0), self.err.seek(0)
        out, err = self.out.read(), self.err.read()
        if check and self.proc.returncode != 0:
            raise AssertionError(f"{self.cmd} exited {self.proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}")
        return self.proc.returncode, out, err


def read_log(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


def evals(out_dir):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_log(out_dir) if "val_loss" in r]


def digest(folder):
    """One hash of every file in a checkpoint folder."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def assert_refused(result, *needles):
    """Exit 1, no traceback, and the message on the last line of stderr."""
    code, _, err = result
    assert code == 1, (code, err[-2000:])
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last


# ----------------------------------------------------------------------------------------------------------

def make_work(root):
    """A small corpus (the start of one play, ~30k tokens) prepared by prepare.py, and the tiny preset, in root."""
    play = sorted(shakespeare_dir().glob("*_gut.txt"))[0].read_text()[:100_000]
    (root / "play.txt").write_text(play)
    prepare(input_path=str(root / "play.txt"), name="tiny", out_root=str(root / "data"), val_fraction=0.1)
    (root / "tiny.py").write_text(TINY_CONFIG)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("work"))


def train_args(work, name, *extra):
    return [TRAIN, work / "tiny.py", f"--data_dir={work / 'data'}", "--dataset=tiny", f"--out_dir={work / name}",
            *extra]


def job_dir(work, name):
    path = work / f"job-{name}"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def wave1(work):
    """Every run that needs no checkpoint, started at once; the base run first in line for the CPU, since
    the second wave waits for it."""
    runs = {
        "base": train_args(work, "base", f"--max_iters={N}"),  # sparse STEM rows, 2 micro-steps
        "whole": train_args(work, "whole", f"--max_iters={2 * N}"),
        "base16": train_args(work, "base16", f"--max_iters={N}", *LEAN),
        "whole16": train_args(work, "whole16", f"--max_iters={2 * N}", *LEAN),
        "dense": train_args(work, "dense", f"--max_iters={N}", "--stem_optim=dense"),
        # dropout draws from torch's generators, which a checkpoint saves: resumed in wave 2
        "dropbase": train_args(work, "dropbase", f"--max_iters={N}", "--dropout=0.1"),
        "dropwhole": train_args(work, "dropwhole", f"--max_iters={2 * N}", "--dropout=0.1"),
        # a checkpoint only when val improves: at lr 0.3 it is best at step 2 and worse after
        "bestonly": train_args(work, "bestonly", f"--max_iters={2 * N}", "--learning_rate=0.3",
                               "--always_save_checkpoint=False"),
        "bestref": train_args(work, "bestref", "--max_iters=2", "--learning_rate=0.3"),
        # the table in host memory (stem_offload.py): the same runs as base and base16, resumed in wave 2
        "offbase": train_args(work, "offbase", f"--max_iters={N}", "--stem_offload=True"),
        "offbase16": train_args(work, "offbase16", f"--max_iters={N}", "--stem_offload=True", *LEAN),
        "moe": train_args(work, "moe", f"--max_iters={N}", "--ffn=moe", "--n_expert=4"),
        # the same global batch of 4 micro-batches: one process, and 2 ranks x 2 micro-steps (DDP's no_sync path)
        "accum4": train_args(work, "accum4", f"--max_iters={N}", "--gradient_accumulation_steps=4"),
        "ddp": [*TORCHRUN, *train_args(work, "ddp", f"--max_iters={N}", "--gradient_accumulation_steps=4")],
        "unknown_key": [TRAIN, "--no_such_key=1"],
        "ill_typed": [TRAIN, "--batch_size=lots"],
        "no_data": [TRAIN, "--data_dir=nowhere"],
        "no_checkpoint": [SAMPLE, "--out_dir=nowhere"],
        "plan": [TRAIN, HERE / "config" / "train_gpt2_small_stem.py", "--plan=True", "--plan_gpu_gb=80",
                 "--data_dir=nowhere"],
    }
    jobs = {name: Job(*args, cwd=job_dir(work, name), nice=0 if name == "base" else 10)
            for name, args in runs.items()}
    # torch.compile on the CPU (inductor), with what it recompiles and where it breaks the graph logged
    jobs["compiled"] = Job(*train_args(work, "compiled", f"--max_iters={2 * N}", "--compile=True"),
                           cwd=job_dir(work, "compiled"), nice=10, env={"TORCH_LOGS": "recompiles,graph_breaks"})
    return jobs


@pytest.fixture(scope="module")
def base_run(work, wave1):
    wave1["base"].result()
    return work / "base"


@pytest.fixture(scope="module")
def wave2(work, wave1, base_run):
    """Every run that starts from the base run's checkpoint (each from its own copy), started at once."""
    for name in ("resumed", "mismatch", "diverge"):
        shutil.copytree(base_run, work / name)
    wave1["base16"].result()
    shutil.copytree(work / "base16", work / "resumed16")
    wave1["dropbase"].result()
    shutil.copytree(work / "dropbase", work / "dropresumed")
    for kind in ("", "16"):
        wave1[f"offbase{kind}"].result()
        shutil.copytree(work / f"offbase{kind}", work / f"offresumed{kind}")
    (work / "long.txt").write_text("To be, or not to be, that is the question. " * 20)
    runs = {
        "resumed": [TRAIN, "--init_from=resume", f"--out_dir={work / 'resumed'}", f"--max_iters={2 * N}"],
        "resumed16": [TRAIN, "--init_from=resume", f"--out_dir={work / 'resumed16'}", f"--max_iters={2 * N}"],
        "dropresumed": [TRAIN, "--init_from=resume", f"--out_dir={work / 'dropresumed'}", f"--max_iters={2 * N}"],
        **{f"offresumed{kind}": [TRAIN, "--init_from=resume", f"--out_dir={work / f'offresumed{kind}'}",
                                 f"--max_iters={2 * N}", "--stem_offload=True"] for kind in ("", "16")},
        "mismatch": [TRAIN, "--init_from=resume", f"--out_dir={work / 'mismatch'}", "--n_layer=3"],
        "diverge": [TRAIN, "--init_from=resume", f"--out_dir={work / 'diverge'}", f"--max_iters={3 * N}",
                    "--learning_rate=1e30", "--warmup_iters=0"],
        "sample": [SAMPLE, f"--out_dir={base_run}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=12",
                   "--temperature=0", "--device=cpu", "--dtype=float32"],
        "long_prompt": [SAMPLE, f"--out_dir={base_run}", f"--start=FILE:{work / 'long.txt'}"],
    }
    return {name: Job(*args, cwd=job_dir(work, name)) for name, args in runs.items()}


# ----------------------------------------------------------------------------------------------------------

def test_train_writes_log_and_checkpoint(base_run):
    ckpt = checkpoint.load(base_run)
    assert ckpt["iter_num"] == N and ckpt["stem_optimizer"] is not None
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_args"]["n_embd"] == 32 and ckpt["model_args"]["ffn"] == "stem"
    assert ckpt["config"]["max_iters"] == N and ckpt["config"]["batch_size"] == 4  # file, then command line
    log = read_log(base_run)
    assert [r["iter"] for r in log if "loss" in r] == list(range(N))
    assert [r["iter"] for r in log if "val_loss" in r] == [0, 2, 4]
    assert set(log[1]) == {"iter", "loss", "lr", "dt_ms", "tokens_per_s"}
    assert losses(base_run)[N - 1] < losses(base_run)[0]


def test_sample_prints_the_greedy_continuation(base_run, wave2):
    """sample.py at temperature 0 prints the prompt and then, token by token, the argmax of the model's own
    full (uncached) forward. (Mutations caught: a KV cache that feeds the wrong positions, a sampler that
    ignores temperature=0, a decode that drops or repeats tokens.)"""
    from model import GPT, GPTConfig
    from prepare import load_tokenizer
    enc = load_tokenizer()
    ckpt = checkpoint.load(base_run)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    ids = torch.tensor([enc.encode("ROMEO:")])
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model.eval()(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    expect = enc.decode([t for t in ids[0].tolist() if t < enc.n_vocab])
    _, out, _ = wave2["sample"].result()
    samples = out.split("---------------\n")
    assert samples == [expect + "\n", expect + "\n", ""]
    assert len(expect) > len("ROMEO:")


@pytest.mark.parametrize("kind", ["", "16"])
def test_resume_is_exact(work, wave1, wave2, kind):
    """N steps, then N more from the checkpoint, equal 2N steps in one run: losses and final weights, bit for
    bit; also for a bf16 table with rowwise moments and stochastic rounding (kind "16")."""
    whole, resumed = work / f"whole{kind}", work / f"resumed{kind}"
    wave1[f"whole{kind}"].result()
    wave2[f"resumed{kind}"].result()
    assert losses(resumed) == losses(whole) and len(losses(whole)) == 2 * N
    assert evals(resumed) == evals(whole)
    a = checkpoint.load(whole)
    b = checkpoint.load(resumed)
    assert a["iter_num"] == b["iter_num"] == 2 * N
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["stem_optimizer"].items():
        assert torch.equal(tensor, b["stem_optimizer"][name]), name
    if kind:
        assert a["model"]["stem_table"].dtype == torch.bfloat16 and a["stem_optimizer"]["exp_avg_sq"].dim() == 1


def test_resume_with_dropout_is_exact(work, wave1, wave2):
    """With dropout 0.1, N steps then N more from the checkpoint equal 2N in one run: the checkpoint restores the
    generators dropout draws from. (Mutation caught: checkpoint.restore_rng that skips torch's generator.)"""
    wave1["dropwhole"].result()
    wave2["dropresumed"].result()
    whole, resumed = work / "dropwhole", work / "dropresumed"
    assert losses(resumed) == losses(whole) and len(losses(whole)) == 2 * N
    assert losses(whole) != losses(work / "whole")  # dropout really acted
    a, b = (checkpoint.load(d)["model"] for d in (whole, resumed))
    assert all(torch.equal(t, b[name]) for name, t in a.items())


def test_checkpoint_only_when_val_improves(work, wave1):
    """always_save_checkpoint=False keeps the checkpoint of the best evaluation: at lr 0.3 val is best at step 2
    and worse at 4, 6 and 8, so the checkpoint holds step 2's model, the same as a run that stopped at step 2.
    (Mutations caught: saving at every evaluation regardless; saving when val gets worse.)"""
    wave1["bestonly"].result()
    wave1["bestref"].result()
    vals = {it: val for it, _, val in evals(work / "bestonly")}
    best = min((it for it in vals if it > 0), key=vals.get)
    assert best == 2 and vals[2 * N] > vals[2]  # the shape this test needs: best early, worse at the end
    ckpt = checkpoint.load(work / "bestonly")
    ref = checkpoint.load(work / "bestref")
    assert ckpt["iter_num"] == 2 and ckpt["best_val_loss"] == vals[2]
    assert all(torch.equal(t, ref["model"][name]) for name, t in ckpt["model"].items())


@pytest.mark.parametrize("kind", ["", "16"])
def test_offloaded_training_through_train_py_is_the_on_device_run(work, wave1, wave2, kind):
    """train.py --stem_offload=True, end to end: 2 micro-steps a step, evaluations between steps, N steps, then
    resumed (offloaded again) to 2N. Losses, evaluations, final weights and row state equal the on-device run of
    2N steps bit for bit; also with the preset's bf16 table, rowwise moments and table decay (kind "16").
    (Mutations caught: an offloaded lookup without the pending decay; a prefetch not refreshed after the update
    of the rows it holds; an evaluation lookup that takes the training batch's prefetched rows.)"""
    whole, offloaded = work / f"whole{kind}", work / f"offresumed{kind}"
    wave1[f"whole{kind}"].result()
    wave2[f"offresumed{kind}"].result()
    assert losses(offloaded) == losses(whole) and len(losses(whole)) == 2 * N
    assert evals(offloaded) == evals(whole) and len(evals(whole)) > 2
    a = checkpoint.load(whole)
    b = checkpoint.load(offloaded)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["stem_optimizer"].items():
        assert torch.equal(tensor, b["stem_optimizer"][name]), name


@pytest.mark.parametrize("name,needles", [
    ("unknown_key", ["unknown key --no_such_key", "valid keys:", "batch_size"]),
    ("ill_typed", ["batch_size must be an int", "'lots'"]),
    ("no_data", ["no train data at nowhere/shakespeare/train.bin", "python prepare.py"]),
    ("no_checkpoint", ["no checkpoint at nowhere", "python train.py"]),
])
def test_bad_input_is_refused_in_one_line(wave1, name, needles):
    result = wave1[name].result(check=False)
    assert_refused(result, *needles)
    assert len(result[2].strip().splitlines()) == 1


def test_sample_refuses_a_prompt_longer_than_the_context(wave2):
    assert_refused(wave2["long_prompt"].result(check=False), "longer than the model's block_size 32")


def test_resume_with_another_model_is_refused(work, base_run, wave2):
    assert_refused(wave2["mismatch"].result(check=False), "n_layer=2", "n_layer=3")
    assert digest(work / "mismatch" / "ckpt") == digest(base_run / "ckpt")


def test_diverging_loss_stops_and_keeps_the_checkpoint(work, base_run, wave2):
    assert_refused(wave2["diverge"].result(check=False), "diverged", "untouched")
    assert digest(work / "diverge" / "ckpt") == digest(base_run / "ckpt")


def test_two_gloo_processes_with_accumulation_match_one(work, wave1):
    """torchrun with 2 CPU processes x 2 micro-steps (FSDP2 shards the dense weights; the table is replicated)
    reaches the losses of 1 process with 4 micro-steps. (Mutations caught: gradients not averaged over the ranks;
    row gradients not gathered across ranks; a rank drawing another rank's micro-batches.)"""
    wave1["accum4"].result()
    wave1["ddp"].result()
    one, two = losses(work / "accum4"), losses(work / "ddp")
    assert one.keys() == two.keys() and len(one) == N
    for it in one:
        assert abs(one[it] - two[it]) < 1e-5, (it, one[it], two[it])
    assert [v for _, _, v in evals(work / "ddp")] == pytest.approx([v for _, _, v in evals(work / "accum4")], abs=1e-5)
    a = checkpoint.load(work / "accum4")["model"]
    b = checkpoint.load(work / "ddp")["model"]
    for name in a:  # (AdamW's m / sqrt(v) magnifies the sums' last bits where a rare row's gradient is near 0)
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_failed_offload_update_stops_training_and_keeps_the_checkpoint(work, monkeypatch):
    """A host-side update that fails on the offload worker stops the run with a one-line error, and the last
    good checkpoint (step 2) stays as it was. The fault is injected by wrapping the real update."""
    import stem_offload
    real_update, calls = stem_offload.OffloadedRowAdamW.update, []

    def update(self, ids, g, lr, decay):
        calls.append(ids.numel())
        if len(calls) == 5:  # two updates a step (the next batch's rows, the rest): this is step 2's first
            raise RuntimeError("injected host fault")
        return real_update(self, ids, g, lr, decay)
    monkeypatch.setattr(stem_offload.OffloadedRowAdamW, "update", update)
    out = work / "offload_fail"
    args = [str(work / "tiny.py"), f"--data_dir={work / 'data'}", "--dataset=tiny", f"--out_dir={out}",
            f"--max_iters={N}", "--stem_offload=True", "--device=cpu", "--dtype=float32"]
    with pytest.raises(stem_offload.OffloadError, match="update of the rows the next batch reads failed .*injected"):
        train.main(args)
    ckpt = checkpoint.load(out)
    assert ckpt["iter_num"] == 2 and int(ckpt["stem_optimizer"]["row_step"].max()) <= 2
    assert not (out / "ckpt.tmp").exists()
    monkeypatch.undo()
    train.main(args[:-3] + ["--init_from=resume", "--stem_offload=True", "--device=cpu"])  # it resumes from it
    assert checkpoint.load(out)["iter_num"] == N


def test_compiled_training_has_one_graph_and_no_recompile_for_new_row_counts(work, wave1):
    """train.py --compile=True (inductor on the CPU) for 8 steps with evaluations: no graph break, and the only
    recompile is the switch between evaluation (no_grad) and training, never a new number of distinct rows per
    batch; the losses are the eager run's. (Mutation caught: StemRows without maybe_mark_dynamic, which
    recompiles on 'stem_rows.ids size mismatch'; a host read in the forward, which breaks the graph.)"""
    _, _, err = wave1["compiled"].result()
    wave1["whole"].result()
    assert "Graph break" not in err, err[-3000:]
    reasons = [l.split(":", 1)[-1].strip() for l in err.splitlines() if "__recompiles" in l and "- " in l]
    assert err.count("Recompiling function") == 1 and reasons and all("grad_mode" in r for r in reasons), \
        err[-3000:]
    compiled, eager = losses(work / "compiled"), losses(work / "whole")
    assert compiled.keys() == eager.keys() and len(compiled) == 2 * N
    for it in eager:
        assert compiled[it] == pytest.approx(eager[it], rel=1e-4), (it, compiled[it], eager[it])


def test_dense_stem_optimizer_trains_like_sparse(work, base_run, wave1):
    """Dense AdamW on the whole table and the sparse row-wise AdamW take the same first step (the rows a
    batch does not touch have zero gradient, and a fresh Adam moves them by zero); then both keep learning."""
    wave1["dense"].result()
    dense, sparse = losses(work / "dense"), losses(base_run)
    assert abs(dense[1] - sparse[1]) < 1e-5
    assert dense[N - 1] < dense[0] and sparse[N - 1] < sparse[0]
    assert checkpoint.load(work / "dense")["stem_optimizer"] is None


def test_moe_trains(work, wave1):
    wave1["moe"].result()
    moe = losses(work / "moe")
    assert moe[N - 1] < moe[0]
    assert checkpoint.load(work / "moe")["model_args"]["ffn"] == "moe"


def test_moe_trains_on_the_loss_plus_its_aux_loss(work):
    """train_step's gradient for an MoE is that of loss + the weighted balance and z-losses (the reported loss is
    the plain one). Adam's first moment after one step is (1 - beta1) x the gradient: the routers' match the
    gradient of loss + aux, computed here by hand on the same micro-batches, and not that of the loss alone.
    (Mutation caught: train_step backpropagating the loss without aux.)"""
    cfg = train.configure([str(work / "tiny.py"), f"--data_dir={work / 'data'}", "--dataset=tiny", "--device=cpu",
                           "--dtype=float32", "--ffn=moe", "--n_expert=4", "--grad_clip=0.0", "--moe_aux_weight=0.1",
                           "--moe_z_weight=0.01"])
    train.setup_distributed(cfg)
    model = train.build_model(cfg)
    reference = {"with aux": train.build_model(cfg), "loss only": train.build_model(cfg)}  # the same weights
    optimizer, _ = train.build_optimizers(cfg, model)
    loss, _ = train.train_step(cfg, model, optimizer, None, train.micro_batches(cfg, None, 0), 1e-3)
    routers = lambda m: [b.ffn.router.weight for b in m.blocks]  # noqa: E731
    got = torch.cat([optimizer.state[w]["exp_avg"].flatten() for w in routers(model)]) / (1 - cfg.beta1)
    batches = train.micro_batches(cfg, None, 0)
    micro = [next(batches)[:2] for _ in range(cfg.micro_steps)]
    for kind, ref in reference.items():
        for x, y in micro:
            _, ref_loss, aux = ref(x, y, return_aux=True)
            ((ref_loss + aux if kind == "with aux" else ref_loss) / cfg.micro_steps).backward()
        reference[kind] = torch.cat([w.grad.flatten() for w in routers(ref)])
    torch.testing.assert_close(got, reference["with aux"], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, reference["loss only"], rtol=1e-2, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# the settings parser, in process (the subprocess tests above cover how its errors reach the user)

def parse(*argv):
    cfg = train.configure(list(argv))
    return {k: getattr(cfg, k) for k in train.DEFAULTS}, cfg.explicit


def test_settings_types():
    settings, explicit = parse("--learning_rate=3", "--stem_layers=[1, 2]", "--d_ff=None", "--compile=true",
                               "--dataset=123", "--lr_decay_iters=50")
    assert settings["learning_rate"] == 3.0 and type(settings["learning_rate"]) is float
    assert settings["stem_layers"] == [1, 2] and settings["d_ff"] is None and settings["compile"] is True
    assert settings["dataset"] == "123" and settings["lr_decay_iters"] == 50
    assert explicit == {"learning_rate", "stem_layers", "d_ff", "compile", "dataset", "lr_decay_iters"}
    for bad in ("--n_layer=True", "--n_layer=2.5", "--dropout='x'", "--stem_layers=3", "--tie_embeddings=1",
                "--batch_size", "batch_size=3"):
        with pytest.raises(ValueError):
            parse(bad)


def test_config_file_assignments_count_as_explicit(tmp_path):
    (tmp_path / "c.py").write_text("import math\nn_layer = 4  # the default, still explicit\n"
                                   "n_embd = 16 * int(math.sqrt(4))\n")
    settings, explicit = parse(str(tmp_path / "c.py"), "--n_embd=64")
    assert settings["n_embd"] == 64 and explicit == {"n_layer", "n_embd"}
    (tmp_path / "bad.py").write_text("n_layers = 4\n")
    with pytest.raises(ValueError, match="unknown key n_layers"):
        parse(str(tmp_path / "bad.py"))


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in train.DEFAULTS:
        assert f"--{key}=" in out
    assert "--stem_optim='sparse'" in out and "row-wise AdamW" in out


def test_help_into_a_reader_that_stopped_is_no_traceback():
    """`python train.py --help | head -1`: the reader leaves before the help is written; train.py exits 0, quietly."""
    proc = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the child has imported torch, so every write it makes meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait() == 0 and "Traceback" not in err, err


def test_lr_schedule():
    cfg = train.configure(["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--max_iters=110"])
    assert train.get_lr(cfg, 0) < train.get_lr(cfg, 9) < train.get_lr(cfg, 10) == pytest.approx(1.0)
    assert train.get_lr(cfg, 60) == pytest.approx(0.55)
    assert train.get_lr(cfg, 110) == train.get_lr(cfg, 500) == 0.1


# ----------------------------------------------------------------------------------------------------------
# the memory plan

def test_plan_prints_and_stops_without_data_or_gpu(wave1):
    _, out, _ = wave1["plan"].result()
    assert "table bfloat16/rowwise" in out and "STEM tables" in out  # the preset's choice
    assert "2.11GB" in out  # 50304 x 11 x 2048 bfloat16
    assert "largest batch_size that fits a 80 GB GPU at block_size 1024:" in out
    assert "starting at step" not in out  # it stopped before building anything


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


MEMORY_PROBE = r"""
import json, sys, train, memory_plan

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

cfg = train.configure(sys.argv[1:])
train.setup_distributed(cfg)
model = train.build_model(cfg)
optimizer, rows_opt = train.build_optimizers(cfg, model)
train.train_step(cfg, model, optimizer, rows_opt, train.micro_batches(cfg, rows_opt, 0), 1e-3)  # makes AdamW's state
kept = [*model.parameters(), *(rows_opt.state_dict().values() if rows_opt else [])]
kept += [v for s in optimizer.state.values() for v in s.values() if v.dim()]
again = train.micro_batches(cfg, rows_opt, 0)  # the same batches: no new row's moments are committed (lazy zeros)
before = rss()
open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak resident size (VmHWM) counts from here
train.train_step(cfg, model, optimizer, rows_opt, again, 1e-3)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"kept": sum(t.numel() * t.element_size() for t in kept if t.dim()), "step": peak - before,
                  "plan": memory_plan.plan(cfg)}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("variant", ["stem", "lean", "swiglu"])
def test_plan_matches_real_allocation(work, tmp_path, variant):
    """The memory plan against a real train_step on a CPU, in a fresh process: what stays between steps (weights,
    dense AdamW moments, table and row state) against the tensors that are there, and what a step adds on top
    (gradients, the step's rows, activations, the [tokens, vocab] tensors of the loss) against the peak resident
    memory the step really reached, measured with the kernel's peak counter. Tokens are a random permutation of
    the vocabulary, so the rows of a step come near the plan's bound (every position a distinct token). The plan
    may be above what a step takes, not below it. (Mutations caught: train_step holding the logits through the
    backward (+25%); the plan without the dense gradients or the loss's [tokens, vocab] gradients.)"""
    rng = np.random.default_rng(0)
    (tmp_path / "perm").mkdir()
    for split in ("train", "val"):
        ids = np.concatenate([rng.permutation(50257) for _ in range(4)]).astype(np.uint16)
        ids.tofile(tmp_path / "perm" / f"{split}.bin")
    args = ["--device=cpu", "--dtype=float32", f"--data_dir={tmp_path}", "--dataset=perm", "--n_layer=2", "--n_embd=128",
            "--batch_size=8", "--block_size=128", "--gradient_accumulation_steps=2",
            *{"stem": [], "lean": LEAN, "swiglu": ["--ffn=swiglu"]}[variant]]
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *args], cwd=HERE, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    planned = {what: device for what, device, _ in got["plan"]}
    kept = sum(b for what, b in planned.items() if what.startswith(("dense weights", "STEM tables", "STEM table opt")))
    step = sum(b for what, b in planned.items() if what.startswith(("dense gradients", "rows of one", "activations")))
    assert kept == got["kept"]  # exact: the same tensors, counted from their shapes
    assert 0.8 * step <= got["step"] <= 1.05 * step, (got["step"] / 2**20, step / 2**20)


def test_plan_counts_what_autograd_saves():
    """The plan's activation estimate against the bytes autograd saves in a forward (saved-tensor hooks)."""
    import memory_plan
    # activations: what autograd saves in a forward (not the weights), with a small vocabulary and wide layers
    # so that the per-layer part, not the logits, dominates
    small = train.configure(["--vocab_size=512", "--n_embd=128", "--n_layer=4", "--block_size=64"])
    torch.manual_seed(0)
    net = train.GPT(train.GPTConfig(**{k: getattr(small, k) for k in train.MODEL_KEYS}))
    weights, saved = {p.untyped_storage().data_ptr() for p in net.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x = torch.randint(0, 512, (4, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, x)
    estimate = memory_plan.saved_activation_bytes(net.config, x.numel(), "float32")
    assert estimate == pytest.approx(sum(saved.values()), rel=0.1)


def test_stem_clip_joint_scales_the_rows_by_the_joint_norm_and_separate_by_their_own(work):
    """One train_step from the same weights and batches without clipping, with stem_clip=joint and with
    =separate, at a grad_clip that both the dense and the table gradients exceed on their own. Adam's first moment
    after one step is (1 - beta1) x the clipped gradient, so it shows how each rule scaled each part: joint both
    by grad_clip / the joint norm, separate the table by grad_clip / the table's own norm and the dense weights by
    grad_clip / theirs. (Mutations caught: the two branches swapped; separate leaving the table unclipped.)"""
    clip, moments, dense, norms = 1e-3, {}, {}, {}
    for rule, grad_clip in (("none", 0.0), ("joint", clip), ("separate", clip)):
        cfg = train.configure([str(work / "tiny.py"), f"--data_dir={work / 'data'}", "--dataset=tiny", "--device=cpu",
                               "--dtype=float32", f"--grad_clip={grad_clip}",
                               f"--stem_clip={'joint' if rule == 'none' else rule}"])
        train.setup_distributed(cfg)
        model = train.build_model(cfg)
        optimizer, rows_opt = train.build_optimizers(cfg, model)
        _, norms[rule] = train.train_step(cfg, model, optimizer, rows_opt, train.micro_batches(cfg, rows_opt, 0), 1e-3)
        moments[rule] = rows_opt.exp_avg.clone()
        dense[rule] = optimizer.state[model.lm_head.weight]["exp_avg"].clone()
    table_norm = moments["none"].norm() / (1 - 0.9)  # the table's own gradient norm, unclipped
    dense_norm = (norms["none"] ** 2 - table_norm ** 2) ** 0.5
    assert table_norm > clip and dense_norm > clip  # both parts are clipped under either rule
    def close(got, expect):  # fp32 rounding of the tiniest entries aside
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5 * expect.abs().max().item())
    scale = lambda norm: clip / (norm + 1e-6)  # noqa: E731  (as torch's clip_grad_norm_)
    close(moments["joint"], moments["none"] * scale(norms["none"]))
    close(dense["joint"], dense["none"] * scale(norms["none"]))
    close(moments["separate"], moments["none"] * scale(table_norm))
    close(dense["separate"], dense["none"] * scale(dense_norm))
    assert norms["separate"] == pytest.approx(dense_norm.item(), rel=1e-4)  # what train_step reports: the backbone's


# ----------------------------------------------------------------------------------------------------------
# sample.py's settings (the same configurator as train.py's; the one-line exit is tested above)

def test_sample_settings_unknown_key_wrong_type_help_and_config_file(base_run, tmp_path, capsys):
    import sample
    with pytest.raises(ValueError, match="unknown key --temp; valid keys: out_dir, start"):
        sample.main(["--temp=0.5"])
    with pytest.raises(ValueError, match="num_samples must be an int, got 'two'"):
        sample.main(["--num_samples=two"])
    with pytest.raises(ValueError, match="edit_mode must be one of one_to_one, average"):
        sample.main(["--edit_mode=copy"])
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--temperature=0.8" in out and "0: always the likeliest token" in out
    (tmp_path / "greedy.py").write_text(f"out_dir = {str(base_run)!r}\nstart = 'ROMEO:'\nnum_samples = 1\n"
                                        "max_new_tokens = 5\ntemperature = 0.0\ndevice = 'cpu'\ndtype = 'float32'\n")
    sample.main([str(tmp_path / "greedy.py")])
    first = capsys.readouterr().out
    sample.main([str(tmp_path / "greedy.py"), "--max_new_tokens=2"])  # the command line wins over the file
    second = capsys.readouterr().out
    assert first.startswith("ROMEO:") and first.count("---------------") == 1
    assert len(second) < len(first) and first.startswith(second.split("\n---")[0])


THP_PROBE = """
import resource, sys
import {module}, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 * 2**20)  # 64 MB, freed at once: a step's logits and their gradient, in small
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() or "[never]" in
                    Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="this kernel has no transparent huge pages")
@pytest.mark.parametrize("module", ["train", "sample", "bench"])
def test_entry_points_turn_on_huge_pages_before_torch_loads(module):
    """train.py, sample.py and bench.py set THP_MEM_ALLOC_ENABLE=1 before torch is imported, so big CPU
    allocations that come and go every step do not fault their pages in again each time; a user's own value
    wins. (Mutation caught: the setdefault removed from any of the three.)"""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def faults(**extra):
        proc = subprocess.run([sys.executable, "-c", THP_PROBE.format(module=module)], cwd=HERE, env={**env, **extra},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])
    default, off = faults(), faults(THP_MEM_ALLOC_ENABLE="0")
    assert default * 5 < off, (default, off)


@pytest.mark.parametrize("offload", [False, True])
def test_table_decay_is_dense_adamws_at_evaluation_and_in_the_checkpoint(tmp_path, offload):
    """stem_weight_decay with the sparse row optimizer (on the device, or offloaded) against plain dense AdamW on
    the whole table, through train_step over a warmup + cosine schedule with 2 micro-steps: tokens 0-31 are in
    every batch, 32-127 never. An evaluation's lookup reads every row as dense AdamW has it (the untouched rows
    decayed, step after step), and the saved checkpoint's table holds those rows, for readers without an optimizer.
    (Mutations caught: a lookup that skips the pending decay; a checkpoint without apply_pending_decay.)"""
    import checkpoint
    vocab, seen = 128, 32
    g = torch.Generator().manual_seed(0)
    data = [torch.stack([torch.randperm(seen, generator=g) for _ in range(2)]) for _ in range(16)]
    tables = {}
    for kind in ("dense", "sparse"):
        cfg = train.configure([f"--out_dir={tmp_path / kind}", f"--vocab_size={vocab}", "--n_layer=2", "--n_head=2",
                               "--n_embd=16", "--d_ff=32", "--block_size=32", "--batch_size=2", "--device=cpu",
                               "--gradient_accumulation_steps=2", "--learning_rate=3e-2", "--min_lr=3e-3",
                               "--warmup_iters=3", "--lr_decay_iters=10", "--max_iters=10", "--weight_decay=0.1",
                               "--stem_weight_decay=0.5", f"--stem_optim={kind}",
                               f"--stem_offload={offload and kind == 'sparse'}"])
        train.setup_distributed(cfg)
        model = train.build_model(cfg)
        optimizer, rows_opt = train.build_optimizers(cfg, model)
        draw = lambda step, micro: (data[2 * step + micro],) * 2 + (data[2 * step + micro].roll(1, 1),)  # noqa
        batches = train.micro_batches(cfg, rows_opt, 0, draw=draw)
        for it in range(6):
            train.train_step(cfg, model, optimizer, rows_opt, batches, train.get_lr(cfg, it))
        if kind == "dense":
            tables["dense"] = model.stem_table.detach().clone()
            continue
        every_row = torch.arange(vocab).view(1, -1)
        tables["lookup"] = rows_opt.lookup(every_row, grad=False).rows  # ids in order: row t is token t's
        os.makedirs(cfg.out_dir)
        checkpoint.save_training(cfg, model, optimizer, rows_opt, 6, 0.0, {})
        rows_opt.close()
        tables["checkpoint"] = checkpoint.load(cfg.out_dir)["model"]["stem_table"]
    dense = tables["dense"]
    decay = torch.prod(torch.tensor([1 - train.get_lr(cfg, it) * 0.5 for it in range(6)], dtype=torch.float64))
    assert decay < 0.95  # the untouched rows really decayed: by 6%, far above the tolerance below
    for name in ("lookup", "checkpoint"):
        torch.testing.assert_close(tables[name], dense, rtol=1e-5, atol=1e-7, msg=name)


def test_each_step_draws_its_own_batches_and_a_resume_redraws_them(work):
    """micro_batches draws new windows for every micro-step of every step (all 8 batches of 4 steps differ), and
    starting at step k (what a resumed run does) yields exactly the batches the run from step 0 had at step k.
    (Mutation caught: windows drawn from (seed, stream) without the step, the same batch every step, which the
    exact-resume tests cannot see: a resumed run then redraws the same batch too.)"""
    cfg = train.configure([str(work / "tiny.py"), f"--data_dir={work / 'data'}", "--dataset=tiny", "--device=cpu"])
    train.setup_distributed(cfg)
    from_start = train.micro_batches(cfg, None, 0)
    batches = [next(from_start) for _ in range(4 * cfg.micro_steps)]
    xs = {tuple(x.flatten().tolist()) for x, _, _ in batches}
    assert len(xs) == len(batches)
    for k in (1, 3):
        resumed = train.micro_batches(cfg, None, k)
        for micro in range(cfg.micro_steps):
            x, y, _ = next(resumed)
            assert torch.equal(x, batches[k * cfg.micro_steps + micro][0])
            assert torch.equal(y, batches[k * cfg.micro_steps + micro][1])
