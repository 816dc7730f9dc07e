"""
STEM tables split by rows over the processes of a torchrun job (train.py --stem_shard=True).

Without it every rank holds the whole table and its optimizer state. Here rank r owns one contiguous block of rows
(shard_bounds: ceil(vocab / world) each, torch.chunk's split, the last ranks fewer) and their row-wise AdamW state;
FSDP2 shards the dense weights (train.py), and leaves the table to this module. Recommendation trainers shard
embeddings the same way (TorchRec's row-wise sharding), and STEM suits it better still: every rank knows its
batch's ids before the forward, so its rows can be on their way early.

ShardedRowAdamW is stem_sparse.SparseRowAdamW over this rank's shard: the update arithmetic, the merges, the
stochastic rounding and the lazy decay are the parent's. What changes is where rows come from and where the
update runs. One step, in all_to_all_single collectives (gloo on CPUs, NCCL on GPUs):

    lookup(X)    dedup X's ids (sorted, so each owner's ids are one run); send each owner how many ids it owns,
                 then the ids; owners gather those rows (with the decay they have had) and send them back in the
                 order asked, which is the order of the ids: the model reads the same StemRows as on one process
    sync()       after the backward, each row's gradient goes to its owner, who merges all ranks' gradients for
                 a row in a fixed order (rank, then position: a sorted segment sum, no atomics) and divides by the
                 world size, as the dense gradients are averaged
    clipping     grad_sq_norm is the owner's sum of squares, all-reduced (one scalar): with the dense gradients'
                 (FSDP2's shards, summed alike) it is the norm one process would clip by
    step(lr)     each owner updates only its rows (bf16 tables: stochastic rounding hashed from the *global* row
                 id, so the bits are those one process would write)

prefetch(X), as offload's: the ids and rows of the next batch are exchanged while this batch computes (the rows'
all_to_all runs asynchronously). A row updated at step s may already have been sent for step s+1, so step() runs,
in order, 1. the update of the rows some rank's prefetched batch reads, 2. an exchange that sends those rows
again, fresh, 3. the update of every other row (with offload, on the worker thread while the next step computes).

Every rank takes part in every exchange in the same order (an evaluation rank without a batch looks up no ids,
but still serves the others), and every collective is issued from the main thread: the table's traffic has its
own process group, so it neither waits behind FSDP2's collectives nor reorders them.

ShardedOffloadedRowAdamW (with --stem_offload=True) keeps the shard and its state in this rank's host memory:
the rows it serves are gathered on the offload worker and copied to the device, and a prefetch's rows leave at the
next exchange, once the worker has them; the rest is the same. A node then holds one copy of the table in all,
not one per GPU.

Two sharded ranks give the bits of two ranks with the table replicated: the owners' merges are the all-gather's
sums, in the same order (test_shard.py checks it through train.py, and 3 ranks against the replicated optimizer).

Checkpoints (checkpoint.py, torch.distributed.checkpoint): state_dict() gives this rank's rows of the table's state
as DTensors sharded by rows (global_rows does the table itself), so every rank writes its own rows and a run
resumes on any number of processes: DCP hands each rank the rows shard_bounds gives it, since a DTensor's Shard(0)
is torch.chunk's split too.
"""

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from model import GPT, StemRows
from stem_offload import OffloadedRowAdamW
from stem_sparse import SparseRowAdamW, merge_rows, sum_of_squares

def shard_bounds(vocab_size, world):
    """[world + 1] row boundaries: rank r owns rows bounds[r]..bounds[r + 1] - 1, ceil(vocab / world) each, the last
    ranks fewer (torch.chunk's split, which a DTensor's Shard(0) and so a checkpoint's resharding follow)."""
    per_rank = -(-vocab_size // world)
    return [min(vocab_size, per_rank * r) for r in range(world + 1)]


def global_rows(local, vocab_size):
    """This rank's rows of a [vocab_size, ...] tensor as a DTensor sharded by rows over every rank (checkpoint.py
    saves and loads it piece by piece). The mesh is on the rows' own device: an offloaded shard stays on the host."""
    mesh = init_device_mesh(local.device.type, (dist.get_world_size(),))
    shape = (vocab_size, *local.shape[1:])
    return DTensor.from_local(local, mesh, [Shard(0)], shape=shape, stride=torch.empty(shape, device="meta").stride(),
                              run_check=False)


EXCHANGE_BYTES = 2 ** 30  # sync(): the gradient rows a rank receives in one round, at most

# ----------------------------------------------------------------------------------------------------------
# the model's side: a GPT that holds only this rank's rows of its table

class _ShardedGPT(GPT):
    """GPT whose init writes only rows lo..hi-1 of its STEM table (see sharded_gpt)."""

    def __init__(self, config, lo, hi, dtype, draw):
        self.__dict__["shard_rows"] = (lo, hi, dtype, draw)  # for reset_parameters, which GPT.__init__ calls
        super().__init__(config)

    def reset_parameters(self):
        table = self._parameters.pop("stem_table", None)
        if table is not None:
            lo, hi, dtype, draw = self.shard_rows
            if draw:  # GPT's init fills the table first (the model's own parameter), then every other weight
                std = math.sqrt(2.0 / (self.config.vocab_size + self.config.d_ff))  # GPT.reset_parameters' xavier
                table.data = draw_normal_rows(*table.shape, lo, hi, std, dtype)
            else:
                table.data = torch.empty(hi - lo, table.size(1), dtype=dtype)
        try:
            super().reset_parameters()
        finally:
            if table is not None:
                self._parameters["stem_table"] = table


def sharded_gpt(config, rank, world, dtype=torch.float32, draw=True):
    """The GPT of config, built after the caller's torch.manual_seed, holding only rank's rows of the STEM table:
    the values GPT(config) would have drawn for them (draw=False: left empty, for a checkpoint to fill). The whole
    table is never written (GPT's torch.empty of it stays untouched): its random numbers are drawn piece by piece
    and this rank's rows kept, so every other weight is GPT's too."""
    lo, hi = shard_bounds(config.vocab_size, world)[rank:rank + 2]
    return _ShardedGPT(config, lo, hi, dtype, draw)


def draw_normal_rows(n_rows, width, lo, hi, std, dtype):
    """Rows lo..hi-1 of torch.empty(n_rows, width).normal_(0, std).to(dtype), drawn piece by piece from the
    global generator, which then stands where that one call would leave it (every row is drawn: the weights
    drawn after the table depend on it). torch's CPU normal_ draws blocks of 16 values, a tensor's last 16 drawn
    again when its size is not a multiple of 16, so pieces that start at multiples of 16 values, the last
    holding at least 16, draw the same numbers as one call (test_shard checks this against GPT itself)."""
    piece = 16 * max(1, 2 ** 20 // (16 * width))  # rows a draw: a multiple of 16, ~1M values
    out = torch.empty(hi - lo, width, dtype=dtype)
    start = 0
    while start < n_rows:
        end = n_rows if (n_rows - start - piece) * width < 16 else start + piece  # a short tail joins this piece
        rows = torch.empty(end - start, width).normal_(0.0, std)
        a, b = max(start, lo), min(end, hi)
        if a < b:
            out[a - lo:b - lo] = rows[a - start:b - start]
        start = end
    return out


# ----------------------------------------------------------------------------------------------------------
# the optimizer's side

@dataclass(eq=False)
class Fetch:
    """One batch's rows on their way: what this rank asked the owners for, and what it serves them."""
    idx: torch.Tensor
    ids: torch.Tensor  # the batch's distinct ids, sorted: owner after owner
    inverse: torch.Tensor
    counts: list  # how many of ids each owner holds
    served: torch.Tensor  # local ids of the rows this rank serves, requester after requester
    served_counts: list  # how many rows each requester asked of this rank
    outgoing: Optional[Callable] = None  # () -> (rows, row_decay) to serve, until they are sent
    rows: Optional[torch.Tensor] = None  # arriving in the order of ids
    row_decay: Optional[torch.Tensor] = None  # their log-decay so far (None without weight decay)
    works: list = field(default_factory=list)  # the asynchronous all_to_alls still running
    refreshes: list = field(default_factory=list)  # (ids, rows, row_decay, works): rows sent again after a step

    def wait(self):
        """The rows as they stand after every refresh (waits for the exchanges)."""
        for work in self.works:
            work.wait()
        for ids, rows, row_decay, works in self.refreshes:
            for work in works:
                work.wait()
            where = torch.searchsorted(self.ids, ids)
            self.rows[where] = rows
            if row_decay is not None:
                self.row_decay[where] = row_decay
        self.works, self.refreshes = [], []
        return self.rows, self.row_decay


class ShardedRowAdamW(SparseRowAdamW):
    defer_sending = False  # ShardedOffloadedRowAdamW: a prefetch's rows leave at the next exchange (see there)

    def __init__(self, table, vocab_size, device=None, **adamw):
        """table: this rank's rows, shard_bounds(vocab_size, world)[rank]..; call it on every rank together
        (it makes the table's process group)."""
        SparseRowAdamW.__init__(self, table, **adamw)
        self._init_shard(vocab_size, device if device is not None else table.device)

    def _init_shard(self, vocab_size, device):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.vocab_size, self.bounds = vocab_size, shard_bounds(vocab_size, self.world)
        self.lo, self.hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        if self.table.size(0) != self.hi - self.lo:
            raise ValueError(f"rank {self.rank} of {self.world} owns rows {self.lo}..{self.hi - 1} of the "
                             f"{vocab_size}-row table, but was given {self.table.size(0)} rows")
        self.device = torch.device(device)  # where the model reads its rows, and where they travel (NCCL: a GPU)
        self.edges = torch.tensor(self.bounds, device=self.device)
        self.group = dist.new_group(backend=dist.get_backend())  # the table's own traffic
        self.incoming = None  # the prefetched batch's Fetch
        self.unsent = None  # a Fetch whose rows are still to be sent (defer_sending)
        self.bytes_sent = {"ids": 0, "rows": 0, "grads": 0}  # to other ranks (bench.py and docs/scaling.md count them)

    # -- exchanges: each one starts with the counts, and sends a deferred prefetch's rows first ------------

    def _counts(self, counts):
        """Tell every rank how many items it gets from this one; returns how many this one gets from each."""
        self._send_unsent()
        send = torch.tensor(counts, device=self.device)
        got = torch.empty_like(send)
        dist.all_to_all_single(got, send, group=self.group)
        self.bytes_sent["ids"] += 8 * (self.world - 1)
        return got.tolist()

    def _send(self, t, send_counts, recv_counts, what, async_op=False):
        """all_to_all_single by rows: t's first send_counts[0] rows go to rank 0, the next to rank 1, ...; returns
        (what arrived, rank after rank; the work to wait for, or None)."""
        t = t.contiguous()
        got = t.new_empty((sum(recv_counts), *t.shape[1:]))
        work = dist.all_to_all_single(got, t, recv_counts, send_counts, group=self.group, async_op=async_op)
        row_bytes = math.prod(t.shape[1:]) * t.element_size()
        self.bytes_sent[what] += (sum(send_counts) - send_counts[self.rank]) * row_bytes
        return got, work

    def _split(self, ids):
        """How many of the sorted ids each rank owns (they are one run per owner)."""
        return torch.searchsorted(ids, self.edges).diff().tolist()

    def _owned(self, local):
        """A function giving rows `local` of this rank's shard as stored, and their log-decay, on the device.
        Here they are read at once; the offload reads them on its worker."""
        rows, row_decay = self.table.detach()[local], self.row_decay[local]
        return lambda: (rows, row_decay)

    def _fetch(self, idx, prefetch=False):
        ids, inverse = torch.unique(idx, return_inverse=True)
        counts = self._split(ids)
        served_counts = self._counts(counts)
        asked, _ = self._send(ids, counts, served_counts, "ids")  # small: waited for, the owners need them now
        fetch = Fetch(idx, ids, inverse, counts, asked - self.lo, served_counts)
        fetch.outgoing = self._owned(fetch.served)
        if prefetch and self.defer_sending:
            self.unsent = fetch
        else:
            self._send_rows(fetch, async_op=prefetch)
        return fetch

    def _send_rows(self, fetch, async_op=True):
        rows, row_decay = fetch.outgoing()
        fetch.outgoing = None
        fetch.rows, work = self._send(rows, fetch.served_counts, fetch.counts, "rows", async_op)
        fetch.works.append(work)
        if self.weight_decay:  # the requester applies the decay due when it reads (a prefetch is a step early)
            fetch.row_decay, work = self._send(row_decay, fetch.served_counts, fetch.counts, "rows", async_op)
            fetch.works.append(work)
        fetch.works = [w for w in fetch.works if w is not None]

    def _send_unsent(self):
        if self.unsent is not None:
            fetch, self.unsent = self.unsent, None
            self._send_rows(fetch)

    def _refresh(self, fetch, updated):
        """Send again the rows of `fetch` that this rank's step just updated (local ids), to whoever asked for them."""
        stale = torch.isin(fetch.served, updated)
        counts = torch.stack([s.sum() for s in stale.split(fetch.served_counts)]).tolist()  # one host read
        got_counts = self._counts(counts)
        ids, w1 = self._send(fetch.served[stale] + self.lo, counts, got_counts, "ids", async_op=True)
        rows, row_decay = self._owned(fetch.served[stale])()
        rows, w2 = self._send(rows, counts, got_counts, "rows", async_op=True)
        works = [w1, w2]
        if self.weight_decay:
            row_decay, w3 = self._send(row_decay, counts, got_counts, "rows", async_op=True)
            works.append(w3)
        else:
            row_decay = None
        fetch.refreshes.append((ids, rows, row_decay, works))

    # -- what the trainer calls -------------------------------------------------------------------------------

    def prefetch(self, idx, idx_host=None):
        """Exchange idx's ids now and start its rows on their way (asynchronously): lookup(idx) waits for them."""
        self.drop_prefetch()
        self.incoming = self._fetch(idx, prefetch=True)

    def drop_prefetch(self):
        """Forget the prefetched batch (every rank together: its rows are still sent, as the others expect)."""
        self._send_unsent()
        if self.incoming is not None:
            self.incoming.wait()
            self.incoming = None

    def lookup(self, idx, grad=True):
        if self.incoming is not None and self.incoming.idx is idx:
            fetch, self.incoming = self.incoming, None
            self._send_unsent()
        else:  # another batch (an evaluation's): exchanged now; the prefetch waits for its own lookup
            fetch = self._fetch(idx)
        rows, row_decay = fetch.wait()
        if row_decay is not None:
            rows = self.decayed(rows, row_decay)
        return StemRows(rows.requires_grad_(grad), fetch.inverse, fetch.ids)

    def sync(self):
        """Every row's gradient to its owner; the owner merges them (rank, then position) and divides by the
        world size, as the dense gradients are averaged. Afterwards self.grad holds this rank's rows, by local id,
        on every rank. The gradients go in rounds of at most EXCHANGE_BYTES received per rank (rows for each
        owner in id order), each round merged into the rows so far: a step touching many rows never lands on an
        owner at once."""
        ids, g = self.grad if self.grad is not None else (self.edges.new_zeros(0), self._no_rows())
        counts = self._split(ids)
        per_round = max(1, EXCHANGE_BYTES // (self.world * g.size(1) * g.element_size()))  # rows, each owner
        rounds = torch.tensor(-(-max(counts) // per_round), device=self.device)
        dist.all_reduce(rounds, dist.ReduceOp.MAX, group=self.group)  # every rank takes part in every round
        starts, merged = [0, *itertools.accumulate(counts)], (ids[:0], g[:0])
        for r in range(max(1, int(rounds))):
            lo = [min(a + r * per_round, b) for a, b in zip(starts, starts[1:])]  # this round's rows of each owner
            send = [min(per_round, b - a) for a, b in zip(lo, starts[1:])]
            part = torch.cat([torch.arange(a, a + n, device=ids.device) for a, n in zip(lo, send)])
            got_counts = self._counts(send)
            got_ids, w1 = self._send(ids[part], send, got_counts, "ids", async_op=True)
            got, w2 = self._send(g[part], send, got_counts, "grads", async_op=True)
            for work in (w1, w2):
                work.wait()
            merged = merge_rows(torch.cat([merged[0], got_ids]), torch.cat([merged[1], got.div_(self.world)]))
        self.grad = (merged[0] - self.lo, merged[1])

    def _no_rows(self):
        return torch.zeros(0, self.table.size(1), dtype=self.table.dtype, device=self.device)

    def grad_sq_norm(self):
        """The sum of squares over every owner's merged rows: the same on every rank (one all_reduce)."""
        local = sum_of_squares(self.grad[1]) if self.grad is not None else \
            torch.zeros((), dtype=torch.float64, device=self.device)
        local = local.to(self.device)
        self._send_unsent()
        dist.all_reduce(local, group=self.group)
        return local

    def step(self, lr):
        if self.grad is None:  # no sync since the last step: still take part in the refresh exchange
            self.grad = (self.edges.new_zeros(0), self._no_rows())
        super().step(lr)

    def run_update(self, ids, g, lr, decay):
        fetch = self.incoming
        if fetch is None:
            return self._update_owned(ids, g, lr, decay, "update of this rank's rows")
        hot = torch.isin(ids, fetch.served)  # rows some rank's prefetched batch reads
        self._update_owned(ids[hot], g[hot], lr, decay, "update of the rows the next batches read")
        self._refresh(fetch, ids[hot])
        self._update_owned(ids[~hot], g[~hot], lr, decay, "update of the other rows")

    def _update_owned(self, ids, g, lr, decay, what):
        self.update(ids, g, lr, decay)

    def cast(self, x, ids, step, salt):
        return super().cast(x, ids + self.lo, step, salt)  # the noise hashes the global row id, as one process's

    def apply_pending_decay(self):
        super().apply_pending_decay()
        if self.weight_decay and self.incoming is not None:  # its rows were sent before the decay was written
            self.prefetch(self.incoming.idx)

    def close(self):
        """Forget the prefetched batch without another exchange (a rank stopping on an error alone must not wait
        for the others: it exits, and torchrun stops the rest), then close as the parent does."""
        self.incoming = self.unsent = None
        super().close()

    def state_dict(self):
        """This rank's rows of the state, as DTensors of the whole vocabulary (checkpoint.py); load_state_dict takes
        them back, or the local rows alone."""
        state = super().state_dict()
        return {k: v if k == "decay" else global_rows(v, self.vocab_size) for k, v in state.items()}

    def load_state_dict(self, state):
        super().load_state_dict({k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()})


class ShardedOffloadedRowAdamW(ShardedRowAdamW, OffloadedRowAdamW):
    """stem_shard with stem_offload: this rank's shard and its state in host memory (stem_offload.py). The rows
    it serves are gathered on the offload worker, in FIFO order after the updates queued before them, and copied to
    the device; its updates run on that worker. A prefetch's rows therefore leave at this rank's next exchange
    (defer_sending; every rank defers alike, so the collectives stay in step), not at once: a prefetch issued
    right after a step would otherwise wait for that step's host update, which instead overlaps the forward."""
    defer_sending = True

    def __init__(self, table, vocab_size, device, **adamw):
        OffloadedRowAdamW.__init__(self, table, device, **adamw)  # the shard moves to host memory
        self._init_shard(vocab_size, device)

    def _owned(self, local):
        future = self._submit("row gather for the other ranks", self._gather_owned, local.cpu())

        def ready():
            future.exception()  # wait; a failed job (this one, or an update before it) raises as itself
            self.check()
            rows, row_decay, event = future.result()
            if self.cuda:
                stream = torch.cuda.current_stream(self.device)
                if event is not None:
                    stream.wait_event(event)
                for t in (rows, row_decay):
                    t.record_stream(stream)
            return rows, row_decay
        return ready

    def _gather_owned(self, local):
        row_decay = self._small_to_device(self.row_decay[local])  # (copied before the event the rows record)
        rows, event = self._to_device(local)
        return rows, row_decay, event

    def _update_owned(self, ids, g, lr, decay, what):
        ids, g = ids.cpu(), g.detach().to("cpu", copy=True)  # one step's owned rows; waits for the GPU
        self.bytes_to_host += g.numel() * g.element_size()
        self._submit(what, self.update, ids, g, lr, decay)
