"""
Row-sharded STEM tables (stem_shard.py, train.py --stem_shard=True) on gloo: CPU processes started by torchrun.

Two kinds of check. The row optimizer itself, in 3 processes, against the replicated DDP optimizer run beside it
in the same processes on the same rows (bit for bit); and train.py as users run it: 1 process, 2 sharded ranks,
then the 2-rank checkpoint resumed on 3 ranks (with offload) and on 1 process. Starting torch costs seconds per
process, so the runs start together, each with one thread, and each test waits for its own.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory_plan
import train
from model import GPT, GPTConfig
from stem_shard import shard_bounds, sharded_gpt
from configurator import ConfigError
from test_train import Job, evals, losses, make_work, read_log

HERE = Path(__file__).resolve().parent
TRAIN = str(HERE / "train.py")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]
N = 4  # steps before the resume; the runs end at 2N
# 6 micro-steps a step: 1 process x 6, 2 ranks x 3, 3 ranks x 2 (the same global batch). A vocab that neither 2
# nor 3 divides; a table decay strong enough to show in the rows, so a row read without its decay shows too.
RUN = ["--gradient_accumulation_steps=6", "--vocab_size=50305", "--stem_weight_decay=1.0", "--device=cpu",
       "--dtype=float32"]


# ----------------------------------------------------------------------------------------------------------
# the shard's initial rows

@pytest.mark.parametrize("vocab,world,d_ff", [(37, 4, 64), (50_304, 3, 64), (699_045, 2, 3)])
def test_a_ranks_model_holds_the_rows_gpt_draws(vocab, world, d_ff):
    """sharded_gpt(config, r, world) after torch.manual_seed equals GPT(config) bit for bit: rank r's rows of the
    table, and every dense weight (GPT draws them after the table, so the whole table's numbers must be drawn).
    Vocabularies that do not divide by the world size; draws in one piece, in four (50,304 rows of 64), and in
    two with a 5-row tail joined to the second (699,045 rows of 3). (Mutations caught: drawing only up to the
    rank's last row, as a first version did; a tail of fewer than 16 values drawn on its own; another std.)"""
    config = dict(n_layer=3 if d_ff > 8 else 2, n_head=2, n_embd=32 if d_ff > 8 else 8, d_ff=d_ff, vocab_size=vocab,
                  block_size=8, stem_layers=[0, 2] if d_ff > 8 else [1])
    torch.manual_seed(7)
    whole = GPT(GPTConfig(**config)).state_dict()
    bounds = shard_bounds(vocab, world)
    assert bounds[0] == 0 and bounds[-1] == vocab
    for rank in range(world):
        lo, hi = bounds[rank], bounds[rank + 1]
        assert vocab // world <= hi - lo <= -(-vocab // world)  # about vocab / world rows each
        torch.manual_seed(7)
        part = sharded_gpt(GPTConfig(**config), rank, world).state_dict()
        assert part.keys() == whole.keys()
        assert torch.equal(part["stem_table"], whole["stem_table"][lo:hi])
        for name, tensor in whole.items():
            assert name == "stem_table" or torch.equal(part[name], tensor), name


# ----------------------------------------------------------------------------------------------------------
# the row optimizer in 3 processes, beside the replicated one

OPTIMIZER_SCRIPT = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import memory_plan, train
from stem_sparse import SparseRowAdamW, clip_grad_norm_
from stem_shard import ShardedOffloadedRowAdamW, ShardedRowAdamW, shard_bounds
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
V, W = 23, 6  # 3 ranks own 7, 8 and 8 rows
lo, hi = shard_bounds(V, world)[rank:rank + 2]
report = {{}}

def batch(step, micro):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    if step == 1 and micro == 1 and rank == 1:
        return torch.zeros(0, 4, dtype=torch.long)  # a micro-batch with no rows
    if step == 2:
        return torch.randint(0, 7, (2, 4), generator=g)  # every id is rank 0's: ranks 1 and 2 own none of them
    return torch.randint(0, V, (2, 4), generator=g)

for name, dtype, state, sharded in [("fp32", torch.float32, "full", ShardedRowAdamW),
                                    ("bf16", torch.bfloat16, "rowwise", ShardedRowAdamW),
                                    ("bf16 offload", torch.bfloat16, "rowwise", ShardedOffloadedRowAdamW)]:
    torch.manual_seed(0)
    whole = torch.nn.Parameter(torch.randn(V, W).to(dtype))
    ref = SparseRowAdamW(whole, weight_decay=0.1, state=state)  # the replicated DDP optimizer: sync() all-gathers
    opt = sharded(torch.nn.Parameter(whole.detach()[lo:hi].clone()), V, "cpu", weight_decay=0.1, state=state)
    out = report[name] = {{"rows": opt.table.size(0), "lookups": 0, "grads": 0, "norms": []}}
    # this rank's table and state in bytes, against the memory plan of a model whose table is [23, 6]
    cfg = train.configure(["--vocab_size=23", "--n_layer=1", "--stem_layers=[0]", "--n_embd=4", "--n_head=2",
                           "--d_ff=6", f"--stem_dtype={{str(dtype)[6:]}}", f"--stem_state={{state}}",
                           f"--stem_offload={{sharded is ShardedOffloadedRowAdamW}}", "--stem_shard=True"])
    cfg.world_size = world
    planned = {{what: device + host for what, device, host in memory_plan.plan(cfg)}}
    out["bytes"] = sum(t.nbytes for t in [opt.table, *opt.state_dict().values()]) - 8  # (decay: a scalar)
    out["planned"] = sum(b for what, b in planned.items() if what.startswith("STEM table"))
    seq = [(s, m) for s in range(4) for m in range(2)]
    X = batch(*seq[0])
    for i, (s, m) in enumerate(seq):  # the trainer's order: lookup, prefetch the next, backward, accumulate
        rows, rrows = opt.lookup(X), ref.lookup(X)
        out["lookups"] += torch.equal(rows.rows, rrows.rows) and torch.equal(rows.ids, rrows.ids)
        if i + 1 < len(seq):
            X_next = batch(*seq[i + 1])
            opt.prefetch(X_next)
        coef = torch.randn(rows.rows.shape, generator=torch.Generator().manual_seed(i + 7 * rank))
        for r in (rows, rrows):  # a gradient that depends on the rows read: a stale row changes it
            (r.rows.float().pow(2) * coef).sum().backward()
        opt.accumulate(rows)
        ref.accumulate(rrows)
        if s == 2 and m == 1:  # an evaluation's lookup while a prefetch is on its way
            e = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(99 + rank))
            out["lookups"] += torch.equal(opt.lookup(e, grad=False).rows, ref.lookup(e, grad=False).rows)
        if m == 1:
            opt.sync()
            ref.sync()
            mine = (ref.grad[0] >= lo) & (ref.grad[0] < hi)
            out["grads"] += torch.equal(opt.grad[0] + lo, ref.grad[0][mine]) and torch.equal(opt.grad[1],
                                                                                           ref.grad[1][mine])
            norms = clip_grad_norm_([], 0.0, opt), clip_grad_norm_([], 0.0, ref)  # max_norm 0: only the norm
            out["norms"].append(tuple(map(float, norms)))
            scale = torch.clamp(0.05 / (norms[1] + 1e-6), max=1.0)  # clip both alike, so the tables stay comparable
            opt.scale_grad(scale)
            ref.scale_grad(scale)
            opt.step(1e-2)
            ref.step(1e-2)
            if s == 1:  # a checkpoint writes the decay into the table while a prefetch is on its way
                opt.apply_pending_decay()
                ref.apply_pending_decay()
        if i + 1 < len(seq):
            X = X_next
    table, full = opt.gather_state()
    if rank == 0:
        out["table"] = torch.equal(table, whole.detach())
        out["state"] = all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    opt.close()
    # and back: a whole state (a checkpoint's) gives each rank its rows
    again = sharded(torch.nn.Parameter(whole.detach()[lo:hi].clone()), V, "cpu", weight_decay=0.1, state=state)
    again.load_state_dict(ref.state_dict())
    out["loaded"] = all(torch.equal(v, ref.state_dict()[k][lo:hi] if v.dim() else ref.state_dict()[k])
                        for k, v in again.state_dict().items())
    again.close()
everyone = [None] * world
dist.all_gather_object(everyone, report)
if rank == 0:
    torch.save(everyone, {out!r})
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def optimizer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_optimizer")
    script, out = root / "shard_rows.py", root / "report.pt"
    script.write_text(OPTIMIZER_SCRIPT.format(repo=str(HERE), out=str(out)))
    job = Job(*TORCHRUN, "--nproc_per_node=3", script, cwd=root)
    return job, out


def test_sharded_rows_equal_the_replicated_optimizers_bit_for_bit(optimizer_run):
    """3 gloo ranks, 4 steps of 2 micro-steps, rows of a 23-row table (7, 8 and 8 rows a rank), with a rank whose
    micro-batch has no rows and a step whose ids are all rank 0's; an evaluation lookup and a checkpoint's decay
    (apply_pending_decay) while a prefetch is on its way. Against SparseRowAdamW replicated by DDP's sync() in the
    same processes: every lookup's rows, every owner's merged gradient, the final table and the optimizer state
    gathered on rank 0, and a reloaded state, bit for bit; the clipping norms to 1e-6. For an fp32 table with full
    moments, and a bf16 table with rowwise moments and stochastic rounding, on the device and offloaded.
    (Mutations caught: no refresh of the rows a prefetch sent before the step updated them; stochastic rounding
    hashed from the local row number; a lookup that drops the rows' pending decay; a re-prefetch skipped after
    apply_pending_decay; owner merges without the division by the world size; a grad_sq_norm not all-reduced.)"""
    job, out = optimizer_run
    finish(job)
    ranks = torch.load(out)
    for name in ("fp32", "bf16", "bf16 offload"):
        for rank, report in enumerate(ranks):
            r = report[name]
            assert r["rows"] == [7, 8, 8][rank], (name, rank)  # about vocab / world each
            assert r["lookups"] == 9 and r["grads"] == 4, (name, rank, r)
            assert r["loaded"], (name, rank)
            for sharded, replicated in r["norms"]:
                assert sharded == pytest.approx(replicated, rel=1e-6), (name, rank)
            assert r["norms"][0][0] > 0.05  # clipping acted, so the norm's value mattered
            assert r["bytes"] <= r["planned"] and (r["rows"] < 8 or r["bytes"] == r["planned"]), (name, rank, r)
        assert ranks[0][name]["table"] and ranks[0][name]["state"], name


# ----------------------------------------------------------------------------------------------------------
# train.py: 1 process, 2 sharded ranks, the 2-rank checkpoint resumed on 3 ranks and on 1 process

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The same small corpus and tiny preset as test_train.py."""
    return make_work(tmp_path_factory.mktemp("shard_work"))


def train_args(work, name, *extra):
    return [TRAIN, work / "tiny.py", f"--data_dir={work / 'data'}", "--dataset=tiny", f"--out_dir={work / name}",
            *RUN, *extra]


def start(work, name, *args):
    path = work / f"job-{name}"
    path.mkdir()
    return Job(*args, cwd=path, nice=10)


def finish(job, timeout=300):
    """job.result(), but a hang (ranks out of step in their collectives) fails in minutes, not gloo's 30."""
    try:
        job.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.proc.terminate()  # torchrun passes SIGTERM on to its workers (a SIGKILL would orphan them)
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.proc.kill()
    return job.result()


@pytest.fixture(scope="module")
def runs(work, optimizer_run):
    """The runs that need no checkpoint start at once; the resumed ones when the 2-rank run is done."""
    jobs = {
        "one": start(work, "one", *train_args(work, "one", f"--max_iters={2 * N}")),
        "two": start(work, "two", *TORCHRUN, "--nproc_per_node=2",
                     *train_args(work, "two", f"--max_iters={N}", "--stem_shard=True")),
        "replicated": start(work, "replicated", *TORCHRUN, "--nproc_per_node=2",
                            *train_args(work, "replicated", f"--max_iters={N}")),  # plain DDP: the whole table
    }
    finish(jobs["two"])
    for name in ("three", "one_resumed"):
        shutil.copytree(work / "two", work / name)
    resume = ["--init_from=resume", f"--max_iters={2 * N}"]
    jobs["three"] = start(work, "three", *TORCHRUN, "--nproc_per_node=3", TRAIN, f"--out_dir={work / 'three'}",
                          *resume, "--stem_shard=True", "--stem_offload=True")
    jobs["one_resumed"] = start(work, "one_resumed", TRAIN, f"--out_dir={work / 'one_resumed'}", *resume)
    return jobs


def test_one_two_and_three_processes_train_alike_and_resume_across_world_sizes(work, runs):
    """train.py as users run it, a global batch of 6 micro-batches and a 50,305-row table (2 and 3 do not divide
    it). 2 sharded ranks for N steps equal 2 replicated DDP ranks bit for bit (log, weights, row state). Resumed on
    3 sharded ranks with the shards in host memory (stem_offload) to 2N, they equal one process's 2N steps: every
    step's loss and every evaluation to 1e-5 (the DDP test's bar), the final weights and row state to 3e-5 (plain
    replicated DDP, 2 ranks, lands 1.2e-5 from one process here: the sums' order); the 2-rank checkpoint resumed
    on one process, without torchrun, too.
    Evaluations have 2 batches for 3 ranks (one rank looks up no ids, and still serves), checkpoints are taken
    with a prefetch on its way, and the checkpoints are one process's format: the same names, shapes and dtypes.
    (Mutations caught: DDP left to see the table, whose shard shapes then differ across ranks; an evaluation rank
    without a batch that skips the exchange (a hang, cut short by the timeout); a checkpoint holding rank 0's
    shard; a resumed rank that takes the checkpoint's first rows instead of its own; stem_shard adopted from the
    checkpoint by a one-process resume.)"""
    for name in ("one", "replicated", "three", "one_resumed"):
        finish(runs[name])
    # 2 sharded ranks are 2 replicated DDP ranks, bit for bit: the owners' merges are the all-gather's sums
    untimed = lambda name: [{k: v for k, v in r.items() if k not in ("dt_ms", "tokens_per_s")}  # noqa: E731
                            for r in read_log(work / name)]
    assert untimed("two") == untimed("replicated")
    a, b = (torch.load(work / name / "ckpt.pt", weights_only=True) for name in ("replicated", "two"))
    for part in ("model", "stem_optimizer"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), (part, key)
    one, want = losses(work / "one"), {it: (t, v) for it, t, v in evals(work / "one")}
    assert len(one) == 2 * N and one[2 * N - 1] < one[0]
    for name, steps in (("two", N), ("three", 2 * N), ("one_resumed", 2 * N)):  # (a resumed log goes on the 2's)
        other = losses(work / name)
        assert sorted(other) == list(range(steps)), name
        for it, loss in other.items():
            assert abs(loss - one[it]) < 1e-5, (name, it, loss, one[it])
        got = evals(work / name)
        assert [it for it, _, _ in got] == list(range(0, steps + 1, 2)), name
        for it, t, v in got:
            assert t == pytest.approx(want[it][0], abs=1e-5) and v == pytest.approx(want[it][1], abs=1e-5), (name, it)
    a = torch.load(work / "one" / "ckpt.pt", weights_only=True)
    for name in ("two", "three", "one_resumed"):
        b = torch.load(work / name / "ckpt.pt", weights_only=True)
        assert b.keys() == a.keys() and b["iter_num"] == (N if name == "two" else 2 * N)
        for part in ("model", "stem_optimizer"):
            assert b[part].keys() == a[part].keys()
            for key, tensor in b[part].items():
                assert tensor.shape == a[part][key].shape and tensor.dtype == a[part][key].dtype, (name, key)
                if name != "two":
                    torch.testing.assert_close(tensor, a[part][key], rtol=1e-4, atol=3e-5, msg=f"{name} {key}")
    assert b["model"]["stem_table"].shape == (50305, 64)


@pytest.mark.parametrize("extra,needles", [
    ([], ["stem_shard=True splits the table over torchrun's processes", "torchrun --standalone"]),
    (["--stem_optim=dense"], ["stem_shard=True needs stem_optim=sparse"]),
    (["--ffn=swiglu"], ["ffn=swiglu has none", "drop --stem_shard"]),
])
def test_bad_input_is_refused_in_one_line(work, extra, needles):
    """train.main as the command line calls it (configurator.run_main prints a ConfigError as its one line)."""
    with pytest.raises(ConfigError) as refused:
        train.main([str(x) for x in train_args(work, "refused", "--stem_shard=True", *extra)[1:]])  # [0]: train.py
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles), str(refused.value)
    assert not (work / "refused").exists()


def test_plan_is_one_ranks():
    """--plan=True with plan_world_size=8: one rank's micro-steps (40 / 8), and with stem_shard its eighth of the
    table and state (ceil(vocab / 8) rows); replicated, the whole table on every rank."""
    base = [str(HERE / "config" / "train_gpt2_small_stem.py"), "--plan=True", "--batch_size=1", "--plan_world_size=8"]
    plans = {shard: memory_plan.plan(train.configure(base + [f"--stem_shard={shard}"])) for shard in (False, True)}
    one = {what: device for what, device, _ in memory_plan.plan(train.configure(base[:3]))}
    replicated = {what: device for what, device, _ in plans[False]}
    sharded = {what.split(" (")[0]: device for what, device, _ in plans[True]}
    width = 11 * 2048  # the preset's bf16/rowwise table: 50,304 rows of 11 layers x 2048
    assert replicated["STEM tables"] == one["STEM tables"] == 50304 * width * 2
    assert sharded["STEM tables"] == 6288 * width * 2
    assert sharded["STEM table optimizer state"] == 6288 * (width * 2 + 4 + 16)
    assert "5 micro-steps" in memory_plan.report(train.configure(base + ["--stem_shard=True"]))
    # the step's rows: 5 micro-steps of 1 x 1024 tokens on one rank of 8, not 40
    assert replicated["rows of one step (at most)"] < one["rows of one step (at most)"]
