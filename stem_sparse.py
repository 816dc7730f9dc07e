"""
Sparse training of the STEM table: a step reads and writes only the rows of the tokens in its batch.

A STEM table holds vocab_size x (n_stem_layers * d_ff) parameters, but a batch of B x T tokens touches at
most B x T distinct rows. The path of one step, in order:
  1. lookup(idx): deduplicate the batch's ids once (unique + inverse, the same for every STEM layer) and copy
     the compact rows table[ids] into a leaf tensor that requires grad; the model reads it as a StemRows;
  2. the backward leaves a compact [n_unique, width] gradient in rows.grad, never a vocab-sized one;
  3. accumulate(rows): merge it into the step's gradient at once, so what waits is one step's distinct rows;
  4. sync(): under torchrun, gather every rank's rows, merge, and average;
  5. clip_grad_norm_ below scales the row gradients with the dense ones (or on their own: stem_clip);
  6. step(lr): a row-wise AdamW on just those rows (update_rows()).

Every sum of table gradients (repeated ids within a micro-step, across micro-steps, across ranks) is a sorted
segment sum, never index_add_ (which uses float atomics on CUDA): replicas stay bit-identical.

Row-wise ("lazy") AdamW, and where it differs from dense AdamW:
  - a row's moments are updated only at steps whose batch contains its token. Dense AdamW keeps moving rows
    with zero gradient (their momentum decays and still pushes them); lazy Adam leaves them as they are.
    Weight decay is the exception: every row decays as under dense AdamW. A row's pending decay (the steps it
    missed) is applied wherever it is read (lookup, so training, evaluation and offload see decayed rows), written
    when it is next updated, and written into the whole table before a checkpoint (apply_pending_decay).
  - bias correction uses each row's own update count (row_step), so a rare token's first update is a
    full-size Adam step, exactly as dense AdamW's first step would be. The first step from a fresh state is
    therefore identical to dense AdamW on every row (with weight decay 0, on all rows; with weight decay,
    on the touched rows).
Clipping (stem_clip=joint): the norm is taken over the dense gradients and the merged row gradients together.
Untouched rows have zero gradient, so this is exactly the norm dense training would clip by.
"""

import math
import mmap

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model import StemRows


def merge_rows(ids, grads):
    """Sum the gradients of repeated ids: (sorted unique ids, their summed rows). index_put_ with accumulate
    sorts on CUDA and runs in order on a CPU, so the sums repeat bit for bit (index_add_ would not on CUDA)."""
    unique, inverse = torch.unique(ids, return_inverse=True)  # ids may be on the host (offload), grads not
    merged = torch.zeros(unique.numel(), grads.size(1), dtype=grads.dtype, device=grads.device)
    merged.index_put_((inverse.to(grads.device),), grads, accumulate=True)
    return unique, merged


def all_gather_rows(ids, grads):
    """Every rank's (ids, grads), concatenated in rank order (ranks hold different numbers of rows)."""
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    pad_ids = ids.new_zeros(max(counts))
    pad_ids[:ids.numel()] = ids
    pad_rows = grads.new_zeros(max(counts), grads.size(1))
    pad_rows[:ids.numel()] = grads
    all_ids = [torch.empty_like(pad_ids) for _ in range(world)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(world)]
    dist.all_gather(all_ids, pad_ids)
    dist.all_gather(all_rows, pad_rows)
    return (torch.cat([t[:n] for t, n in zip(all_ids, counts)]),
            torch.cat([t[:n] for t, n in zip(all_rows, counts)]))


def stochastic_round_bf16(x, noise):
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction, so the result is unbiased:
    add 16 random low bits to the fp32 bit pattern and cut them off (the carry rounds up). PyTorch has no
    such cast; FBGEMM and torchao use the same trick for low-precision tables."""
    bits = x.view(torch.int32) + noise.to(torch.int32)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)  # the low 16 bits are zero: exact in bf16


def hash_noise(ids, steps, width, salt):
    """16 random bits per element, a hash of (row id, that row's update count, column, salt): the same bits
    wherever and in whatever order a row is updated (offload's split update, replicas, a resumed run)."""
    mask = 0xFFFFFFFF
    x = (ids.unsqueeze(1) * 0x9E3779B1 + steps.unsqueeze(1) * 0x85EBCA77 + salt * 0xC2B2AE3D) & mask
    x = (x + torch.arange(width, device=ids.device) * 0x27D4EB2F) & mask
    for _ in range(2):  # murmur3's finaliser, twice
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & mask
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & mask
        x ^= x >> 16
    return x & 0xFFFF


def lazy_zeros(shape, dtype, device):
    """Zeros whose host memory is committed only where they are written, a 4 KB page at a time: the moments of
    rows no batch has touched cost nothing on a CPU. Anonymous mmap memory reads as zero until written
    (torch.zeros writes every page); MADV_NOHUGEPAGE keeps it in small pages, else the first write of a scattered
    row commits (and zeroes) a 2 MB huge page: writing 1,000 rows of a 405 MB moment committed all of it, with
    numpy's zeros (numpy asks for huge pages for big arrays) as with torch's allocator under THP_MEM_ALLOC_ENABLE."""
    numel = math.prod(shape)
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size())
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=numel).view(shape)  # the tensor keeps the mapping alive


class SparseRowAdamW:
    """Owns model.stem_table's training when stem_optim=sparse (the table leaves the dense optimizer and
    stops requiring grad, so autograd, FSDP2 and clipping never see a dense table gradient).

    Memory per table parameter: the weight and the first moment in the table's dtype, plus the second moment:
    fp32 per element (state="full": 12 bytes in all for an fp32 table) or one fp32 per row, the mean of g^2
    over the row (state="rowwise", as FBGEMM's PARTIAL_ROWWISE_ADAM and Adam-mini do: 4 bytes for bf16).
    A bf16 table is updated in fp32 and written back with stochastic rounding (rounding="stochastic"), or
    to nearest (rounding="nearest", which loses updates smaller than half a bf16 step).
    Weight decay is decoupled, as AdamW's, and complete: a row that was not touched for k steps has the decay
    of those k steps (a running product of (1 - lr_t * wd)) applied when it is read and when it is next
    written, so every row is as dense AdamW would have it, although only the batch's rows are written."""

    def __init__(self, table, lr_mult=1.0, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, state="full",
                 rounding="stochastic", seed=0):
        if state not in ("full", "rowwise") or rounding not in ("stochastic", "nearest"):
            raise ValueError(f"stem_state must be full or rowwise and rounding stochastic or nearest, got "
                             f"{state!r}, {rounding!r}")
        self.table = table
        table.requires_grad_(False)
        self.lr_mult, self.weight_decay, self.betas, self.eps = lr_mult, weight_decay, betas, eps
        self.rowwise, self.rounding, self.seed = state == "rowwise", rounding, seed
        self.exp_avg = lazy_zeros(table.shape, table.dtype, table.device)
        self.exp_avg_sq = lazy_zeros(table.shape[:1] if self.rowwise else table.shape, torch.float32, table.device)
        self.row_step = torch.zeros(table.size(0), dtype=torch.int64, device=table.device)
        self.row_decay = torch.zeros(table.size(0), dtype=torch.float64, device=table.device)  # log-decay seen
        self.decay = 0.0  # sum over all steps so far of log(1 - lr_t * wd): the log of the running product
        self.grad = None  # (sorted ids, summed gradient rows) of the step so far


    def prefetch(self, idx, idx_host=None):
        """A hint that idx is a coming batch; the rows are on the device already, so nothing to do here."""

    def close(self):
        """Release what the optimizer holds outside Python's reach: nothing here (stem_offload.py has a worker
        thread and page-locked memory)."""

    def lookup(self, idx, grad=True):
        ids, inverse = torch.unique(idx, return_inverse=True)
        rows = self.decayed(self.table.detach()[ids], self.row_decay[ids])
        return StemRows(rows.requires_grad_(grad), inverse, ids)

    def decayed(self, rows, row_decay):
        """The rows as dense AdamW would have them now: with the decay of the steps since each was last written
        (row_decay: the log-decay they have had), so training, evaluation and offload all read decayed rows."""
        if not self.weight_decay:
            return rows
        return (rows.float() * torch.exp(self.decay - row_decay).float().unsqueeze(1)).to(rows.dtype)

    @torch.no_grad()
    def apply_pending_decay(self, rows_at_once=4096):
        """Write every row's pending decay into the table itself (before a checkpoint is saved): the saved table
        is then the one dense AdamW would have, and sample.py or any other reader of the checkpoint needs no optimizer.
        The multiply and rounding are the lookup's and the update's, so a run that saves changes in the last
        bits only (bf16 tables: stochastic rounding, as every write)."""
        if not self.weight_decay:
            return
        stale = (self.row_decay != self.decay).nonzero().flatten()
        for i in range(0, stale.numel(), rows_at_once):
            ids = stale[i:i + rows_at_once]
            p = self.decayed(self.table[ids].float(), self.row_decay[ids])
            self.table[ids] = self.cast(p, ids, self.row_step[ids].unsqueeze(1), salt=2)
            self.row_decay[ids] = self.decay

    def accumulate(self, lookup):
        """Merge a micro-step's row gradients into the step's, now (memory stays one step's distinct rows)."""
        if lookup.rows.grad is None:
            return
        ids, g = lookup.ids, lookup.rows.grad
        if self.grad is not None:
            ids, g = merge_rows(torch.cat([self.grad[0], ids]), torch.cat([self.grad[1], g]))
        self.grad = (ids, g)

    def sync(self):
        """Under torchrun, sum over ranks and divide by the world size, as the dense gradients are averaged, so
        every rank applies the same update to its replica."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids, g = self.grad if self.grad is not None else (self.table.new_zeros(0, dtype=torch.int64),
                                                              self.table.new_zeros(0, self.table.size(1)))
            ids, g = all_gather_rows(ids, g)
            self.grad = merge_rows(ids, g / dist.get_world_size()) if ids.numel() else None

    def grad_sq_norm(self):
        return sum_of_squares(self.grad[1])

    def scale_grad(self, factor):
        if self.grad is not None:
            self.grad[1].mul_(factor.to(self.grad[1].device) if torch.is_tensor(factor) else factor)

    def step(self, lr):
        lr = lr * self.lr_mult
        self.decay += math.log1p(-lr * self.weight_decay)  # every step decays every row, touched or not
        if self.grad is not None:
            ids, g = self.grad
            self.grad = None
            self.run_update(ids, g, lr, self.decay)

    def run_update(self, ids, g, lr, decay):
        """Where the step's update runs: here, at once (stem_offload.py queues it on its worker instead)."""
        self.update(ids, g, lr, decay)

    @torch.no_grad()
    def update(self, ids, g, lr, decay, rows_at_once=4096):
        """AdamW on rows ids of the table with their gradient g. Rows are independent, so they go in slices:
        the fp32 temporaries stay a few rows_at_once x width, however many rows a step touched."""
        for i in range(0, ids.numel(), rows_at_once):
            self.update_rows(ids[i:i + rows_at_once], g[i:i + rows_at_once], lr, decay)

    def update_rows(self, ids, g, lr, decay):
        """In fp32. With state=full and an fp32 table this is torch.optim.AdamW's single-tensor arithmetic, in
        its order, so a first step equals dense AdamW's bit for bit. decay: the log of the decay product up to
        and including this step."""
        ids, g = ids.to(self.table.device), g.to(self.table.device, torch.float32)
        beta1, beta2 = self.betas
        step = self.row_step[ids] + 1
        self.row_step[ids] = step
        m = self.exp_avg[ids].float().mul_(beta1).add_(g, alpha=1 - beta1)
        if self.rowwise:
            v = self.exp_avg_sq[ids].mul_(beta2).add_(g.pow(2).mean(dim=1), alpha=1 - beta2).unsqueeze(1)
        else:
            v = self.exp_avg_sq[ids].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        self.exp_avg_sq[ids] = v.squeeze(1) if self.rowwise else v
        step = step.double().unsqueeze(1)
        step_size = (lr / (1 - beta1 ** step)).float()
        bias_correction2_sqrt = ((1 - beta2 ** step) ** 0.5).float()
        p = self.table[ids].float()
        if self.weight_decay:
            # the decay of every step since this row's last update, this one included
            p.mul_(torch.exp(decay - self.row_decay[ids]).float().unsqueeze(1))
            self.row_decay[ids] = decay
        p.add_(-step_size * m / (v.sqrt() / bias_correction2_sqrt + self.eps))
        self.table[ids] = self.cast(p, ids, step, salt=0)
        self.exp_avg[ids] = self.cast(m, ids, step, salt=1)

    def cast(self, x, ids, step, salt):
        if self.table.dtype != torch.bfloat16 or self.rounding == "nearest":
            return x.to(self.table.dtype)
        noise = hash_noise(ids, step.squeeze(1).long(), x.size(1), salt + 2 * self.seed)
        return stochastic_round_bf16(x, noise)

    def state_dict(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "row_step": self.row_step,
                "row_decay": self.row_decay, "decay": torch.tensor(self.decay, dtype=torch.float64)}

    def load_state_dict(self, state):
        for name in ("exp_avg", "exp_avg_sq", "row_step", "row_decay"):
            if state[name].shape != getattr(self, name).shape:
                raise ValueError(f"the checkpoint's STEM optimizer {name} has shape {tuple(state[name].shape)}, "
                                 f"this run's {tuple(getattr(self, name).shape)}: stem_state and stem_dtype "
                                 f"must match the checkpoint's")
            getattr(self, name).copy_(state[name])
        self.decay = float(state["decay"])


def sum_of_squares(t, chunk=1 << 20):
    """The sum of t's squares in float64, a chunk at a time (a float64 copy of t would be twice its size). In
    float64 it rounds to the same float32 however t is split (FSDP's shards, a sharded table's rows) and summed:
    the clipping scale, and so training, is the same on any number of processes."""
    flat = t.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for i in range(0, flat.numel(), chunk):
        total += flat[i:i + chunk].double().pow(2).sum()
    return total


def clip_grad_norm_(parameters, max_norm, row_optimizer=None):
    """torch.nn.utils.clip_grad_norm_ over the dense gradients and the sparse row gradients together. Under FSDP2
    each rank holds a shard of every dense gradient (a DTensor): their squares are summed over the ranks.
    Returns the total norm before clipping, in float32 as torch's does (it is summed in float64)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    pieces = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # the same tensors' storage
    squares = [sum_of_squares(g) for g in pieces]
    if any(isinstance(g, DTensor) for g in grads):
        squares = [torch.stack(squares).sum()]
        dist.all_reduce(squares[0])
    if row_optimizer is not None and row_optimizer.grad is not None:
        squares.append(row_optimizer.grad_sq_norm())
    if not squares:
        return torch.zeros(())
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0).float()
        for g in pieces:
            g.mul_(scale.to(g.device))
        if row_optimizer is not None:
            row_optimizer.scale_grad(scale)
    return total.float()
