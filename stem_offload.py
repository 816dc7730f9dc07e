"""
STEM tables in host memory, with the rows each step needs copied to the device ahead of time.

The table ([vocab, n_stem_layers * d_ff], a token's rows for every layer contiguous) and its row-wise AdamW
state stay in plain host memory. This works because the token ids are the routing: the rows a batch needs are
known as soon as the batch is, before its forward starts. Only the small staging buffers the rows are gathered
into are page-locked: every host-to-device copy reads from them, never from the table, so locking the table
(8.4 GB a rank for the 1B all-layers model) would cost seconds at start-up and buy nothing.

OffloadedRowAdamW is stem_sparse.SparseRowAdamW with the table on the host: accumulate, sync, clipping and the
update arithmetic are the parent's. What changes is where rows come from and when the update runs. One
worker thread does every read and write of the host table, in submission order (FIFO):

    prefetch(X)  worker: dedup X's ids, gather their rows into pinned staging, copy them to the device on a
                 dedicated copy stream, record an event
    lookup(X)    the compute stream waits on that event; the rows arrive as a leaf that requires grad
    step(lr)     the copy stream brings the step's merged gradient to host memory; then the worker runs
                   1. the update of the rows that the prefetched next batch also reads,
                   2. a re-copy of exactly those rows into that batch's device buffer,
                   3. the update of every other row,
                 and lookup(next) waits for 2 only. So the host update of step s overlaps the device compute
                 of step s+1, and step s+1 still reads rows that include step s's update.

A failed worker job is never lost: the next prefetch, lookup, step, flush or state_dict raises it, so a
checkpoint cannot be written with an update missing.

On a machine without CUDA the same code runs with host and device both the CPU: no pinning, no streams, and
the worker thread still overlaps with compute. That is how the tests exercise it.

Sampling (HostRowFetcher): the rows of each new token are fetched from host memory as it is generated, with a
small device cache of rows (least-frequently-used eviction: token frequencies are Zipfian).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from model import StemRows
from stem_sparse import SparseRowAdamW


class OffloadError(ValueError):
    """A host-side job failed; the trainer prints it as one line."""


class OffloadedRowAdamW(SparseRowAdamW):
    def __init__(self, table, device, **adamw):
        """close() when done (train.py and bench.py do): it waits for the queued host updates."""
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stem-offload")  # no thread until a job
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        table.data = table.data.to("cpu", copy=True)  # the parameter itself now lives in host memory
        super().__init__(table, **adamw)  # the moments are made beside it, in host memory
        self.closed = False
        self.jobs = []  # (what, future) of every job not yet known to have succeeded
        self.failed = None  # the message of the first job that failed
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging, self.flip = [None, None], 0  # double-buffered pinned staging for gathers: (buffer, last
        # event that read it). Small, so from the caching host allocator, which frees a dropped buffer only after
        # the copies recorded on it are done
        self.prefetched = None  # (idx, future of _gather's tuple, idx on the host) of the next batch
        self.bytes_to_device = self.bytes_to_host = 0
        self.on_event = None  # called with the name of each job as it starts and ends (tests record the order)

    # -- the worker thread: the only code that touches the host table ------------------------------------

    def _submit(self, what, fn, *args):
        if self.closed:
            raise OffloadError("this offloaded STEM table's optimizer was closed")
        self.check()

        def job():
            self._note(f"{what} start")
            out = fn(*args)
            self._note(f"{what} end")
            return out
        future = self.worker.submit(job)
        self.jobs.append((what, future))
        return future

    def _note(self, event):
        if self.on_event is not None:
            self.on_event(event)

    def check(self):
        """Raise the first failure of a finished job, and keep raising it: the host table is missing that work."""
        for what, future in list(self.jobs):
            if future.done():
                self.jobs.remove((what, future))
                e = future.exception()
                if e is not None and self.failed is None:
                    self.failed = (f"the offloaded STEM table's {what} failed ({type(e).__name__}: {e}); the host "
                                   f"table is missing that work, so training stops here")
        if self.failed is not None:
            raise OffloadError(self.failed)

    def _to_device(self, ids, into=None, where=None):
        """Copy table rows ids to the device on the copy stream; returns (device rows, event). With into and
        where, the rows overwrite into[where] instead."""
        n, width = ids.numel(), self.table.size(1)
        self.bytes_to_device += n * width * self.table.element_size()
        if not self.cuda:
            rows = self.table.index_select(0, ids)
            if into is not None:
                into[where] = rows
            return (rows if into is None else into), None
        k = self.flip = 1 - self.flip
        if self.staging[k] is None or self.staging[k][0].size(0) < n:
            self.staging[k] = (torch.empty(max(n, 1), width, dtype=self.table.dtype, pin_memory=True), None)
        buffer, last = self.staging[k]
        if last is not None:
            last.synchronize()  # the copy that last read this staging buffer is done
        staged = torch.index_select(self.table, 0, ids, out=buffer[:n])
        with torch.cuda.stream(self.copy_stream):
            rows = staged.to(self.device, non_blocking=True)
            if into is not None:
                into[where.to(self.device, non_blocking=True)] = rows
                rows = into
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.staging[k] = (buffer, event)
        return rows, event

    def _small_to_device(self, t):
        """A small host tensor to the device on the copy stream, ordered before the next event recorded there."""
        if not self.cuda:
            return t
        with torch.cuda.stream(self.copy_stream):
            return t.pin_memory().to(self.device, non_blocking=True)

    def _gather(self, idx_host):
        """(ids, inverse, rows, their row_decay, event): the rows as stored; lookup() applies the decay they miss
        as of the step it runs at (a prefetch runs a step early)."""
        ids, inverse = torch.unique(idx_host, return_inverse=True)
        inverse, row_decay = self._small_to_device(inverse), self._small_to_device(self.row_decay[ids])
        rows, event = self._to_device(ids)
        return ids, inverse, rows, row_decay, event

    def _update_hot(self, ids, grad, grad_ready, fetched, lr, decay):
        if grad_ready is not None:
            grad_ready.synchronize()  # the gradient's copy to host memory has landed
        hot = torch.isin(ids, fetched.result()[0]) if fetched is not None else torch.zeros_like(ids, dtype=bool)
        self.update(ids[hot], grad[hot], lr, decay)
        return ids[~hot], grad[~hot], ids[hot]

    def _refresh(self, fetched, hot_job):
        """The prefetched batch's copies of the rows just updated are stale: overwrite them on the device."""
        ids, inverse, rows, row_decay, event = fetched.result()
        changed = hot_job.result()[2]
        where = torch.isin(ids, changed).nonzero().flatten()
        if where.numel():  # (on the copy stream, so after the prefetch's own copy)
            row_decay = self._small_to_device(self.row_decay[ids])
            rows, event = self._to_device(ids[where], into=rows, where=where)
        return ids, inverse, rows, row_decay, event

    def _update_rest(self, hot_job, lr, decay):
        ids, grad, _ = hot_job.result()
        self.update(ids, grad, lr, decay)

    # -- what the trainer calls -------------------------------------------------------------------------------

    def prefetch(self, idx, idx_host=None):
        """Start fetching idx's rows now. idx_host (the batch before it went to the GPU) spares a copy back."""
        host = idx_host if idx_host is not None else idx.to("cpu")
        self.prefetched = (idx, self._submit("row gather", self._gather, host), host)

    def lookup(self, idx, grad=True):
        if self.prefetched is not None and self.prefetched[0] is idx:
            future, self.prefetched = self.prefetched[1], None
        else:  # another batch (an evaluation's): fetched now, and the prefetch waits for its own lookup
            future = self._submit("row gather", self._gather, idx.to("cpu"))
        future.exception()  # wait; then a failed job (this one, or an update it waited for) raises as itself
        self.check()
        ids, inverse, rows, row_decay, event = future.result()
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            if event is not None:
                stream.wait_event(event)
            for t in (rows, inverse, row_decay):
                t.record_stream(stream)
        self._note("lookup")
        return StemRows(self.decayed(rows, row_decay).requires_grad_(grad), inverse, ids)

    def step(self, lr):
        self.check()  # a failed job stops training here too, even at a step with no rows
        super().step(lr)

    def run_update(self, ids, grad, lr, decay):
        grad_ready = None
        if self.cuda:  # device-to-host on the copy stream, after the compute stream has produced the gradient
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                host = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)  # one step's rows: small
                host.copy_(grad, non_blocking=True)
                grad.record_stream(self.copy_stream)
                grad_ready = torch.cuda.Event()
                grad_ready.record(self.copy_stream)
            grad = host
        else:
            grad = grad.detach().clone()
        self.bytes_to_host += grad.numel() * grad.element_size()
        fetched = self.prefetched[1] if self.prefetched is not None else None
        hot = self._submit("update of the rows the next batch reads", self._update_hot, ids, grad, grad_ready,
                           fetched, lr, decay)
        if fetched is not None:
            idx, _, host = self.prefetched
            self.prefetched = (idx, self._submit("re-copy of updated rows", self._refresh, fetched, hot), host)
        self._submit("update of the other rows", self._update_rest, hot, lr, decay)

    def flush(self):
        """Wait until every queued job is done, and raise if one failed (before the table is saved)."""
        for _, future in list(self.jobs):
            future.exception()  # waits
        self.check()

    def close(self):
        """Finish every queued job and stop the worker. Idempotent; the table stays usable as a plain host tensor.
        Raises a failed job's error."""
        if self.closed:
            return
        self.closed = True
        try:
            self.flush()
        finally:
            self.worker.shutdown(wait=True)

    def __del__(self):
        # Every queued job holds this object, so none is left when it is dropped; the last reference may die on
        # the worker thread itself, which must not wait for (join) itself.
        self.worker.shutdown(wait=False)

    def apply_pending_decay(self):
        self.flush()  # the worker is idle: the host table is this thread's until the next job
        super().apply_pending_decay()
        if self.prefetched is not None:  # its rows were gathered before the decay was written: gather them again
            self.prefetch(self.prefetched[0], self.prefetched[2])

    def state_dict(self):
        self.flush()
        return super().state_dict()

    def load_state_dict(self, state):
        self.flush()
        super().load_state_dict(state)


class HostRowFetcher:
    """stem_rows_fn for GPT.generate when the table is in host memory: fetches the rows of the tokens in
    the window being fed, through a device cache of the most frequently used rows."""

    def __init__(self, table, device, cache_rows=4096):
        self.table, self.device = table, torch.device(device)
        self.cache = torch.empty(min(cache_rows, table.size(0)), table.size(1), dtype=table.dtype,
                                 device=self.device)
        self.slot_of = {}  # token id -> row of self.cache
        self.uses = {}  # token id -> how often it was asked for (eviction picks the least used)
        self.lock = threading.Lock()

    def __call__(self, tokens, start):
        ids, inverse = torch.unique(tokens[:, start:].cpu(), return_inverse=True)
        if ids.numel() > self.cache.size(0):  # more distinct tokens than the cache holds: copy them directly
            return StemRows(self.table.index_select(0, ids).to(self.device), inverse.to(self.device), ids)
        with self.lock:
            slots = [self._slot(t, keep=set(ids.tolist())) for t in ids.tolist()]
        return StemRows(self.cache[torch.tensor(slots, device=self.device)], inverse.to(self.device), ids)

    def _slot(self, token, keep):
        self.uses[token] = self.uses.get(token, 0) + 1
        if token in self.slot_of:
            return self.slot_of[token]
        if len(self.slot_of) < self.cache.size(0):
            slot = len(self.slot_of)
        else:
            victim = min((t for t in self.slot_of if t not in keep), key=self.uses.get)
            slot = self.slot_of.pop(victim)
        self.cache[slot] = self.table[token].to(self.device, non_blocking=True)
        self.slot_of[token] = slot
        return slot
