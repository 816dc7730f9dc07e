"""
The STEM layer's one non-matmul op, h = SiLU(gate) * E[t], as a fused Triton kernel for GPUs.

model.py computes it in plain PyTorch, F.silu(gate) * F.embedding(t, E); that is the reference and the CPU path.
On a GPU the kernel here does the same in one pass that reads each row of E in place, so the gathered
[tokens, d_ff] tensor E[t] is never written to memory. Its backward recomputes SiLU and the gather instead of
saving activations, and sums each row's gradient without float atomics, in two passes:

  pass 1: the positions, sorted by the row they read, are cut into chunks of at most CHUNK positions of one
          row; a program per (chunk, column block) writes its positions' gate gradients and one partial sum
  pass 2: a program per (row, column block) adds that row's partials in chunk order

Which positions each pass-1 program sums (backward_plan) depends only on the token ids, so GPT.forward builds
it once for all STEM layers, from ops whose output sizes do not depend on the data: the backward never waits
for a value read back from the GPU.

Real text is Zipfian ('\\n' fills ~12% of a Shakespeare batch), so summing a row's positions in one serial
loop would make the backward wait on its most frequent token; with chunks the longest serial chain is
CHUNK + (that token's positions / CHUNK). The order of every sum is fixed, so runs repeat bit for bit.

The op is registered with torch.library.custom_op, so torch.compile sees one opaque op and does not break
the graph. On a CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1): that is how the tests
check them against the PyTorch path.
"""

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the PyTorch path needs nothing else
    triton = None

KERNELS = ("auto", "triton", "torch")
CHUNK = 32  # positions per pass-1 program: the serial work of one program in the backward


def use_triton(kernel, device):
    """auto -> the Triton kernel on CUDA when triton imports. An explicit choice that cannot run is an error."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown stem_kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "auto":
        return triton is not None and on_cuda
    if kernel == "triton":
        if triton is None:
            raise ValueError("stem_kernel=triton needs the triton package: pip install triton "
                             "(or use stem_kernel=torch)")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("stem_kernel=triton on a CPU needs TRITON_INTERPRET=1 (Triton's interpreter, slow; "
                             "for tests), or use stem_kernel=torch")
    return kernel == "triton"


def backward_plan(inverse, n_rows, chunk=CHUNK):
    """The backward's work plan: which positions each pass-1 program sums. It depends only on inverse and the
    number of rows, so GPT.forward builds it once per forward and every STEM layer's backward shares it. Every
    op here has an output size known from the input sizes (argsort, searchsorted, cumsum; no bincount, unique
    or nonzero): on a GPU nothing waits for a value read back to the host, and it builds on the meta device.
    Returns [order, begin, end, row_of_chunk, first_chunk]:
      order          positions sorted by the row they read; stable, so a row's positions keep their order
      chunk c        covers order[begin[c]:end[c]]: at most `chunk` positions, all of row row_of_chunk[c]
      first_chunk    row r's chunks are first_chunk[r]:first_chunk[r + 1]
    There are n_rows + ceil(n / chunk) chunks, a bound on what the rows can need whatever the ids; those past
    the last row's are empty (begin == end) and pass 2 never reads them."""
    flat = inverse.reshape(-1)
    n, device = flat.numel(), flat.device
    order = torch.argsort(flat, stable=True)
    sorted_rows, rows = flat[order], torch.arange(n_rows, device=device)
    seg_start = torch.searchsorted(sorted_rows, rows)  # where row r's positions begin in order
    count = torch.searchsorted(sorted_rows, rows, right=True) - seg_start
    first_chunk = torch.cat([count.new_zeros(1), torch.cumsum((count + chunk - 1) // chunk, 0)])
    c = torch.arange(n_rows + (n + chunk - 1) // chunk, device=device)
    row_of_chunk = (torch.searchsorted(first_chunk, c, right=True) - 1).clamp(max=max(n_rows - 1, 0))
    begin = seg_start[row_of_chunk] + (c - first_chunk[row_of_chunk]) * chunk  # chunk k of its row starts k * chunk in
    end = torch.minimum(begin + chunk, seg_start[row_of_chunk] + count[row_of_chunk])
    used = c < first_chunk[-1]
    return [order, torch.where(used, begin, n), torch.where(used, end, n), row_of_chunk, first_chunk]


def _on_device(t):
    """Triton launches on the current CUDA device, not on its arguments': without this guard, --device=cuda:1
    (no torchrun) would run the kernel on GPU 0 with GPU 1's pointers."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


if triton is not None:
    @triton.jit
    def _forward_kernel(gate, rows, inverse, out, D, stride_g, stride_r, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)  # one program per (position, column block)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        r = tl.load(inverse + i).to(tl.int64)
        g = tl.load(gate + i * stride_g + cols, mask=mask, other=0.0).to(tl.float32)  # fp32 before any math
        u = tl.load(rows + r * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out + i * stride_g + cols, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_pass1(gate, rows, grad_h, order, begin, end, row_of_chunk, grad_gate, partial,
                        D, stride_g, stride_r, BLOCK: tl.constexpr):
        c = tl.program_id(0).to(tl.int64)  # one program per (chunk, column block)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        r = tl.load(row_of_chunk + c)
        u = tl.load(rows + r * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(tl.load(begin + c), tl.load(end + c)):  # at most CHUNK positions, in sorted order
            i = tl.load(order + j)
            g = tl.load(gate + i * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            dh = tl.load(grad_h + i * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            acc += dh * g * sig  # d(h)/d(row) = SiLU(gate)
            tl.store(grad_gate + i * stride_g + cols,
                     (dh * u * sig * (1 + g * (1 - sig))).to(grad_gate.dtype.element_ty), mask=mask)
        tl.store(partial + c * D + cols, acc, mask=mask)

    @triton.jit
    def _backward_pass2(partial, first_chunk, grad_rows, D, stride_gr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)  # one program per (row, column block)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(tl.load(first_chunk + r), tl.load(first_chunk + r + 1)):
            acc += tl.load(partial + c * D + cols, mask=mask, other=0.0)
        tl.store(grad_rows + r * stride_gr + cols, acc.to(grad_rows.dtype.element_ty), mask=mask)


def _grid(n, D):
    block = min(1024, triton.next_power_of_2(D))
    return (n, triton.cdiv(D, block)), block


@torch.library.custom_op("stem::silu_mul_rows", mutates_args=())
def silu_mul_rows(gate: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor,
                  plan: list[torch.Tensor]) -> torch.Tensor:
    """SiLU(gate) * rows[inverse]. gate: [..., D]; rows: [R, D], row stride may exceed D (one layer's column
    block of the stacked table); inverse: gate.shape[:-1] ints in [0, R); plan: backward_plan(inverse, R), kept
    for the backward (empty when no gradient is wanted). Returns a contiguous tensor of gate's dtype."""
    D = gate.size(-1)
    g2, flat = gate.reshape(-1, D).contiguous(), inverse.reshape(-1).contiguous()
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    out = torch.empty_like(g2)
    grid, block = _grid(g2.size(0), D)
    with _on_device(gate):
        _forward_kernel[grid](g2, rows, flat, out, D, g2.stride(0), rows.stride(0), BLOCK=block)
    return out.view(gate.shape)


@silu_mul_rows.register_fake
def _(gate, rows, inverse, plan):
    return gate.new_empty(gate.shape)  # contiguous, as the real op's (empty_like would keep gate's strides)


@torch.library.custom_op("stem::silu_mul_rows_backward", mutates_args=())
def silu_mul_rows_backward(grad_h: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor,
                           plan: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of gate, grad of rows) of silu_mul_rows, in two passes that follow plan (see backward_plan)."""
    if len(plan) != 5:
        raise ValueError("silu_mul_rows was called without a backward plan: build it with "
                         "stem_ops.backward_plan(inverse, rows.size(0)) when a gradient is wanted")
    D = gate.size(-1)
    g2, dh = gate.reshape(-1, D).contiguous(), grad_h.reshape(-1, D).contiguous()
    rows = rows if rows.stride(1) == 1 else rows.contiguous()
    order, begin, end, row_of_chunk, first_chunk = plan
    grad_gate = torch.empty_like(g2)
    partial = torch.empty(begin.numel(), D, dtype=torch.float32, device=gate.device)
    grad_rows = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    with _on_device(gate):
        grid, block = _grid(begin.numel(), D)
        if begin.numel():
            _backward_pass1[grid](g2, rows, dh, order, begin, end, row_of_chunk, grad_gate, partial, D,
                                  g2.stride(0), rows.stride(0), BLOCK=block)
        grid, block = _grid(rows.size(0), D)
        if rows.size(0):
            _backward_pass2[grid](partial, first_chunk, grad_rows, D, grad_rows.stride(0), BLOCK=block)
    return grad_gate.view(gate.shape), grad_rows


@silu_mul_rows_backward.register_fake
def _(grad_h, gate, rows, inverse, plan):
    return gate.new_empty(gate.shape), rows.new_empty(rows.shape)


def _save(ctx, inputs, output):
    gate, rows, inverse, plan = inputs
    ctx.save_for_backward(gate, rows, inverse, *plan)


def _backward(ctx, grad_h):
    gate, rows, inverse, *plan = ctx.saved_tensors
    grad_gate, grad_rows = silu_mul_rows_backward(grad_h, gate, rows, inverse, plan)
    return grad_gate, grad_rows, None, [None] * len(plan)


silu_mul_rows.register_autograd(_backward, setup_context=_save)
