"""
What a training run keeps in memory, counted before anything is allocated (the model is built on the meta
device). train.py prints it at the start of a run; `python train.py --plan=True` prints it and stops, and with
--plan_gpu_gb=80 also names the largest batch_size that fits a GPU of that size. `python memory_plan.py <train.py
settings>` (or under torchrun) measures one rank of such a run on a CPU against the plan: what it keeps, and what
a checkpoint's save and resume add (Linux: peak resident memory; test_shard.py checks it; docs/scaling.md quotes it).

Bytes per parameter: dense weights 4 + AdamW moments 8, and a gradient of 4 while a step runs. A STEM table
parameter: the weight and the first moment in stem_dtype (4 or 2 each) and the second moment, 4 per element
(stem_state=full) or 4 per row (rowwise): 12 bytes for float32/full, about 4 for bfloat16/rowwise. Rows of a step
are counted at their upper bound (every position a distinct token); real text touches far fewer (see bench.py's
capacity table).
The step's rows grow with gradient_accumulation_steps: the micro-steps' rows are merged as they come, so a
step holds the union of all its micro-batches' distinct tokens, up to the whole table for big batches (40
micro-steps of 12 x 1024 tokens touch nearly every GPT-2 token).
Activations: what autograd saves per position, about 11 [n_embd] and 4 [d_ff] tensors a layer (measured with
saved-tensor hooks, see test_train.py), plus the [vocab] log-softmax, and at the start of the backward two more
[tokens, vocab] tensors, the gradients of the loss's log-softmax and of the logits (train_step does not keep the
logits). Under bfloat16 autocast the [d_ff] tensors take 2 bytes. test_train.py checks the whole of a step
against the peak resident memory of a real one, on a CPU in float32.

Under torchrun the plan is one rank's (world_size from torchrun, or plan_world_size with --plan=True): its share
of the micro-steps, and with stem_shard its ceil(vocab / world) rows of the table and their state. A sharded rank
also holds the rows it serves the others and their gradients: at most every rank's distinct ids that fall in its
shard (test_shard.py checks the table and state against the tensors of real ranks). FSDP2 (any torchrun run, and
dense_offload) keeps 1/world of the dense weights, gradients and moments (on the host with dense_offload) and
gathers whole only the weights computing now: the root's (embedding, head, final norm) and two blocks (this one
and the next, prefetched), in the compute dtype, plus one block's fp32 gradients before their reduce-scatter.
A checkpoint (torch.distributed.checkpoint) is written tensor by tensor from where the tensors are, each GPU
tensor through a host copy; resuming reads each tensor into host memory and copies it in place (twice the
largest a rank holds), into a copy of the dense moments (test_shard.py checks both against a real run's peak RSS).
"""

import torch

from model import GPT, GPTConfig
from stem_shard import EXCHANGE_BYTES

GB = 2 ** 30


def saved_activation_bytes(c, positions, dtype):
    """Bytes autograd saves in one micro-batch's forward."""
    d_ff_bytes = 2 if dtype == "bfloat16" else 4  # under autocast the norms still save float32 copies
    per_position = c.n_layer * (11 * c.n_embd * 4 + 4 * c.d_ff * d_ff_bytes) + 3 * c.n_embd * 4 + 4 * c.vocab_size
    return positions * per_position


def world_size(cfg):
    """The processes planned for: torchrun's, or plan_world_size when planning without it."""
    world = getattr(cfg, "world_size", 1)
    return world if world > 1 else getattr(cfg, "plan_world_size", 1)


def plan(cfg, batch_size=None):
    """[(what, device bytes, host bytes)] for one rank of a run with settings cfg (train.py's), at batch_size."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in GPTConfig.__dataclass_fields__}))
    c = model.config
    B, world, bf16 = batch_size or cfg.batch_size, world_size(cfg), cfg.dtype == "bfloat16"
    shard = getattr(cfg, "stem_shard", False)
    positions, micro = B * cfg.block_size, max(1, cfg.gradient_accumulation_steps // world)
    table = model.stem_table.numel() if model.stem_table is not None else 0
    dense = model.num_params() - table
    rows, offload = [], getattr(cfg, "dense_offload", False)
    if world > 1 or offload:  # FSDP2: 1/world of every dense tensor here, in host memory with dense_offload
        piece = -(-dense // world)
        block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
        root = dense - sum(p.numel() for b in model.blocks for p in b.parameters())
        if offload:
            rows.append((f"dense weights + AdamW moments (1/{world}, FSDP2, offloaded)", 0, 12 * piece))
            rows.append(("dense gradients (during a step)", 4 * block, 4 * piece))
        else:
            rows.append((f"dense weights + AdamW moments (1/{world}, FSDP2)", 12 * piece, 0))
            rows.append(("dense gradients (during a step)", 4 * block + 4 * piece, 0))
        rows.append(("weights gathered to compute (root + 2 blocks)", (root + 2 * block) * (2 if bf16 else 4), 0))
    else:
        rows.append(("dense weights + AdamW moments", 12 * dense, 0))
        rows.append(("dense gradients (during a step)", 4 * dense, 0))
    if table:
        V, W = model.stem_table.shape
        tb = 2 if cfg.stem_dtype == "bfloat16" else 4
        if shard:  # this rank's rows only (the largest shard: ceil(V / world))
            V = -(-V // world)
            table = V * W
        if cfg.stem_optim == "dense":
            state = 12 * table  # gradient and two fp32 moments, the whole table every step
        else:
            state = tb * table + (4 * V if cfg.stem_state == "rowwise" else 4 * table) + 16 * V  # + row_step, row_decay
        where = (lambda n: (0, n)) if cfg.stem_offload else (lambda n: (n, 0))
        rows.append((f"STEM tables{f' (1/{world}: {V:,} rows)' if shard else ''}", *where(tb * table)))
        rows.append(("STEM table optimizer state", *where(state)))
        if shard:
            vocab = model.stem_table.size(0)
            step_rows = min(vocab, micro * positions)  # this rank's step, merged as it comes
            mine = 3 * min(vocab, positions) + step_rows  # its rows, their gradient, the prefetched batch's
            per_round = max(1, EXCHANGE_BYTES // (world * W * tb))  # sync() sends the gradients in rounds
            served = world * min(V, positions) + world * min(V, step_rows, per_round) + min(V, world * step_rows)
            # rows it serves (one batch's for every rank), the gradients it receives in a round, and their merge
            update = 6 * min(V, world * step_rows, 4096) * W * 4
            rows.append(("rows this rank reads (at most)", mine * W * tb, 0))
            merged = min(V, world * step_rows) * W * tb  # with offload: copied to host memory for the update
            rows.append(("rows it serves, their gradients (at most)", served * W * tb,
                         merged + update if cfg.stem_offload else 0))
            if not cfg.stem_offload:
                rows.append(("update temporaries", update, 0))
            else:
                rows.append(("pinned staging for row copies", 0, 2 * world * min(V, positions) * W * tb))
        elif cfg.stem_optim == "sparse":
            step_rows = min(V, micro * positions)  # at most: every position a distinct token
            buffers = (2 * min(V, positions) + step_rows) * W * tb  # rows, their gradient; the step's merge
            update = 6 * min(step_rows, 4096) * W * 4  # fp32 temporaries of the update, 4096 rows at a time
            if cfg.stem_offload:
                rows.append(("rows of one step (at most)", buffers, update))
                rows.append(("pinned staging for row copies", 0, 2 * min(V, positions) * W * tb))
            else:
                rows.append(("rows of one step (at most)", buffers + update, 0))
    activations = saved_activation_bytes(c, positions, cfg.dtype) + 2 * positions * c.vocab_size * 4
    rows.append((f"activations, batch_size {B} x {cfg.block_size} (estimate)", activations, 0))
    return rows


def checkpoint_bytes(cfg):
    """(host bytes a save adds; host and device bytes a resume adds) on one rank, at most. A save writes the tensors
    where they are, a GPU tensor through a host copy of it. A resume reads each tensor into host memory and copies
    it into place (twice the largest), into a copy of the dense AdamW moments that is then loaded (their size)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in GPTConfig.__dataclass_fields__}))
    world, offload = world_size(cfg), getattr(cfg, "dense_offload", False)
    sharded = world > 1 or offload
    dense = [p.numel() for p in model.parameters() if p is not model.stem_table]
    largest = 4 * (-(-max(dense) // world) if sharded else max(dense))  # fp32 weights and moments
    moments = 8 * (-(-sum(dense) // world) if sharded else sum(dense))
    table = 0
    if model.stem_table is not None:
        V, W = model.stem_table.shape
        V = -(-V // world) if getattr(cfg, "stem_shard", False) else V
        full = cfg.stem_optim == "dense" or cfg.stem_state == "full" or cfg.stem_dtype == "float32"
        table = V * W * (4 if full else 2)
    on_gpu = torch.device(cfg.device).type == "cuda"
    save = max(largest * (on_gpu and not offload), table * (on_gpu and not cfg.stem_offload))
    resume_host = 2 * max(largest, table) + moments * (offload or not on_gpu)
    return save, resume_host, moments * (on_gpu and not offload)


def largest_batch(cfg, gpu_bytes):
    """The largest batch_size whose plan fits gpu_bytes, leaving 10% to the allocator; 0 if none does."""
    fits = lambda b: sum(device for _, device, _ in plan(cfg, b)) <= 0.9 * gpu_bytes
    lo, hi = 0, 1
    while hi <= 4096 and fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def report(cfg):
    rows = plan(cfg)
    width = max(len(r[0]) for r in rows) + 2
    world = world_size(cfg)
    micro = max(1, cfg.gradient_accumulation_steps // world)
    ranks = "" if world == 1 else f"one rank of {world}, {'table sharded' if cfg.stem_shard else 'table replicated'}; "
    ranks += "dense part offloaded; " if getattr(cfg, "dense_offload", False) else ""
    lines = [f"memory plan ({ranks}{'offload' if cfg.stem_offload else 'on the device'}, table {cfg.stem_dtype}/"
             f"{cfg.stem_state}; batch_size {cfg.batch_size} x block_size {cfg.block_size}, {micro} micro-steps a "
             f"step, {cfg.dtype}):", f"  {'':{width}}{'device':>10}{'host':>10}"]
    for what, device, host in rows + [("total", sum(r[1] for r in rows), sum(r[2] for r in rows))]:
        lines.append(f"  {what:{width}}{device / GB:>8.2f}GB{host / GB:>8.2f}GB")
    save, resume_host, resume_device = checkpoint_bytes(cfg)
    lines.append(f"  a checkpoint adds, for a moment: {save / GB:.2f}GB host at a save; {resume_host / GB:.2f}GB host "
                 f"and {resume_device / GB:.2f}GB device at a resume")
    if getattr(cfg, "plan_gpu_gb", 0):
        best = largest_batch(cfg, cfg.plan_gpu_gb * GB)
        lines.append(f"  largest batch_size that fits a {cfg.plan_gpu_gb:g} GB GPU at block_size {cfg.block_size}: "
                     + (str(best) if best else "none (try stem_dtype=bfloat16 stem_state=rowwise, stem_offload=True, "
                                               "dense_offload=True)"))
    return "\n".join(lines)


def measure(argv):
    """One rank of train.py's run with settings argv, on a CPU: one step, then a checkpoint's save and resume, each
    timed and with the rise of this process's peak resident memory; what it keeps between steps, against the plan.
    Prints a JSON line."""
    import json
    import time
    import checkpoint
    import train

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096

    def peak_since(before):
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024 - before
    cfg = train.configure(argv)
    train.setup_distributed(cfg)
    model = train.build_model(cfg)
    optimizer, rows_opt = train.build_optimizers(cfg, model)
    for t in (rows_opt.exp_avg, rows_opt.exp_avg_sq):
        t.fill_(1.0)  # every row's moments committed, as after a long run
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(cfg.rank))
    batches = train.micro_batches(cfg, rows_opt, 0, draw=lambda step, micro: (x[:, :-1], x[:, :-1], x[:, 1:]))
    train.train_step(cfg, model, optimizer, rows_opt, batches, 1e-3)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 (FSDP2's shards)
    kept = [local(p) for p in model.parameters() if p is not model.stem_table]
    kept += [local(v) for s in optimizer.state.values() for v in s.values() if v.dim()]
    state = [rows_opt.table, rows_opt.exp_avg, rows_opt.exp_avg_sq]
    report = dict(rank=cfg.rank, kept=sum(t.nbytes for t in kept + state + [rows_opt.row_step, rows_opt.row_decay]),
                  kept_planned=sum(d + h for what, d, h in plan(cfg) if what.startswith(("dense weights", "STEM tab"))),
                  plan=checkpoint_bytes(cfg), table_and_state=sum(t.nbytes for t in state))
    for what, fn in (("save", lambda: checkpoint.save_training(cfg, model, optimizer, rows_opt, 1, 1.0, {})),
                     ("resume", lambda: checkpoint.resume_training(cfg, model, optimizer, rows_opt))):
        before, t0 = rss(), time.perf_counter()
        open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak resident size (VmHWM) counts from here
        fn()
        report.update({what: peak_since(before), what + "_s": time.perf_counter() - t0, "steady": before})
    print(json.dumps(report))
    rows_opt.close()
    if cfg.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import sys
    measure(sys.argv[1:])
