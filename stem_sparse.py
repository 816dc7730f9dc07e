"""
Sparse training of the STEM table: a step reads and writes only the rows of the tokens in its batch.

A STEM table holds vocab_size x (n_stem_layers * d_ff) parameters, but a batch of B x T tokens touches at
most B x T distinct rows. The path of one step, in order:
  1. lookup(idx): deduplicate the batch's ids once (unique + inverse, the same for every STEM layer) and copy
     the compact rows table[ids] into a leaf tensor that requires grad; the model reads it as a StemRows;
  2. the backward leaves a compact [n_unique, width] gradient in rows.grad, never a vocab-sized one;
  3. accumulate(rows): merge it into the step's gradient at once, so what waits is one step's distinct rows;
  4. sync(): under DDP, gather every rank's rows, merge, and average;
  5. clip_grad_norm_ below scales dense and row gradients together;
  6. step(lr): a row-wise AdamW on just those rows (update()).

Every sum of table gradients (repeated ids within a micro-step, across micro-steps, across ranks) is a sorted
segment sum, never index_add_ (which uses float atomics on CUDA): replicas stay bit-identical.

Row-wise ("lazy") AdamW, and where it differs from dense AdamW:
  - a row's moments and weight decay are updated only at steps whose batch contains its token. Dense AdamW
    keeps moving rows with zero gradient (their momentum decays and still pushes them) and decays every row
    every step; lazy Adam leaves untouched rows bit-identical.
  - bias correction uses each row's own update count (row_step), so a rare token's first update is a
    full-size Adam step, exactly as dense AdamW's first step would be. The first step from a fresh state is
    therefore identical to dense AdamW on every row (with weight decay 0, on all rows; with weight decay,
    on the touched rows).
Clipping: the norm is taken over the dense gradients and the merged row gradients together. Untouched rows
have zero gradient, so this is exactly the norm dense training would clip by.
"""

import torch
import torch.distributed as dist

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


class SparseRowAdamW:
    """Owns model.stem_table's training when stem_optim=sparse (the table leaves the dense optimizer and
    stops requiring grad, so autograd, DDP and clipping never see a dense table gradient)."""

    def __init__(self, table, lr_mult=1.0, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
        self.table = table
        table.requires_grad_(False)
        self.lr_mult, self.weight_decay, self.betas, self.eps = lr_mult, weight_decay, betas, eps
        self.exp_avg = torch.zeros_like(table)
        self.exp_avg_sq = torch.zeros_like(table)
        self.row_step = torch.zeros(table.size(0), dtype=torch.int64, device=table.device)
        self.grad = None  # (sorted ids, summed gradient rows) of the step so far

    def prefetch(self, idx):
        """A hint that idx is a coming batch; the rows are on the device already, so nothing to do here."""

    def lookup(self, idx, grad=True):
        ids, inverse = torch.unique(idx, return_inverse=True)
        return StemRows(self.table.detach()[ids].requires_grad_(grad), inverse, ids)

    def accumulate(self, lookup):
        """Merge a micro-step's row gradients into the step's, now (memory stays one step's distinct rows)."""
        if lookup.rows.grad is None:
            return
        ids, g = lookup.ids, lookup.rows.grad
        if self.grad is not None:
            ids, g = merge_rows(torch.cat([self.grad[0], ids]), torch.cat([self.grad[1], g]))
        self.grad = (ids, g)

    def sync(self):
        """Under DDP, sum over ranks and divide by the world size, matching DDP's gradient averaging, so every
        rank applies the same update to its replica."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids, g = self.grad if self.grad is not None else (self.table.new_zeros(0, dtype=torch.int64),
                                                              self.table.new_zeros(0, self.table.size(1)))
            ids, g = all_gather_rows(ids, g)
            self.grad = merge_rows(ids, g / dist.get_world_size()) if ids.numel() else None

    def grad_sq_norm(self):
        return self.grad[1].float().pow(2).sum() if self.grad is not None else torch.zeros(())

    def scale_grad(self, factor):
        if self.grad is not None:
            self.grad[1].mul_(factor.to(self.grad[1].device) if torch.is_tensor(factor) else factor)

    def step(self, lr):
        if self.grad is not None:
            ids, g = self.grad
            self.grad = None
            self.update(ids, g, lr)

    @torch.no_grad()
    def update(self, ids, g, lr):
        """AdamW on rows ids of the table with their gradient g. The same arithmetic, in the same order, as
        torch.optim.AdamW's single-tensor path, so a first step equals dense AdamW's bit for bit."""
        ids = ids.to(self.table.device)
        g = g.to(self.table.device)
        lr = lr * self.lr_mult
        beta1, beta2 = self.betas
        step = self.row_step[ids] + 1
        self.row_step[ids] = step
        m = self.exp_avg[ids].mul_(beta1).add_(g, alpha=1 - beta1)
        v = self.exp_avg_sq[ids].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        self.exp_avg[ids] = m
        self.exp_avg_sq[ids] = v
        step = step.double().unsqueeze(1)
        step_size = (lr / (1 - beta1 ** step)).to(g.dtype)
        bias_correction2_sqrt = ((1 - beta2 ** step) ** 0.5).to(g.dtype)
        p = self.table[ids]
        if self.weight_decay:
            p.mul_(1 - lr * self.weight_decay)
        p.add_(-step_size * m / (v.sqrt() / bias_correction2_sqrt + self.eps))
        self.table[ids] = p

    def state_dict(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "row_step": self.row_step}

    def load_state_dict(self, state):
        for name in ("exp_avg", "exp_avg_sq", "row_step"):
            getattr(self, name).copy_(state[name])


def clip_grad_norm_(parameters, max_norm, row_optimizer=None):
    """torch.nn.utils.clip_grad_norm_ over the dense gradients and the sparse row gradients together.
    Returns the total norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sq = sum((torch.linalg.vector_norm(g.float()) ** 2 for g in grads), torch.zeros(()))
    if grads:
        sq = sq.to(grads[0].device)
    if row_optimizer is not None:
        sq = sq + row_optimizer.grad_sq_norm().to(sq.device)
    total = sq.sqrt()
    if max_norm > 0:
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, scale)
        if row_optimizer is not None:
            row_optimizer.scale_grad(scale)
    return total
