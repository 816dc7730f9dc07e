"""
Train a GPT whose FFNs are STEM (default), SwiGLU or MoE, on one process or several (torchrun, FSDP2):

    python train.py                                     # a small STEM model on data/shakespeare, on a CPU
    python train.py config/train_gpt2_small_stem.py     # a preset file, then --key=value overrides
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_stem.py  # --stem_shard=True: split table
Settings: the block below (--help); data: prepare.py's .bin files; out_dir gets log.jsonl and ckpt/ (checkpoint.py).
"""

import dataclasses
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

# Before torch loads: huge pages for the logits and their gradient, else re-faulted every step (+16% step time)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm

import checkpoint
import configurator
import memory_plan
import prepare
import stem_sparse
from configurator import ConfigError
from model import GPT, GPTConfig, check_ids
from stem_ops import KERNELS

# ----------------------------------------------------------------------------------------------------------
# settings: the defaults train a small STEM model on Shakespeare on two CPU cores
# I/O
out_dir = "out"  # checkpoint and log.jsonl go here
eval_interval = 100  # evaluate (and checkpoint) every this many steps, and after the last one
eval_iters = 10  # batches per split in an evaluation; the same batches every time, so evaluations compare
log_interval = 10  # write a log.jsonl line every this many steps
always_save_checkpoint = True  # save at every evaluation; False: only when val loss improves (nanoGPT's choice)
init_from = "scratch"  # "scratch", or "resume" from out_dir/ckpt/: N steps, then N more, run as 2N in one go
# data
data_dir = "data"  # where prepare.py wrote its folders
dataset = "shakespeare"  # data_dir/dataset/{train,val}.bin
batch_size = 8  # sequences per micro-step per process
block_size = 128  # tokens per sequence (the model's context length)
gradient_accumulation_steps = 1  # micro-steps per optimizer step, over all processes together
# model (GPTConfig; see model.py)
vocab_size = 50304  # GPT-2's 50257 tokens padded to a multiple of 64
n_layer = 4
n_head = 4
n_embd = 64  # small: on a CPU the 50304-way softmax, not the width, sets the cost of a token
d_ff = None  # FFN hidden size; None: 8/3 * n_embd rounded up to a multiple of 64
ffn = "stem"  # "stem", "swiglu", "moe", or the ablations "stem_dagger", "stem_gate"
stem_layers = None  # which layers get a STEM FFN, e.g. [1, 3]; None: every layer but layer 0
n_expert = 8  # MoE only
moe_top_k = 2  # MoE only: experts per token
moe_aux_weight = 0.01  # MoE load-balancing loss weight (added to the trained loss, not the reported one)
moe_z_weight = 0.001  # MoE router z-loss weight
rope_theta = 10000.0
norm_eps = 1e-5
dropout = 0.0
tie_embeddings = False
# AdamW and its schedule: linear warmup, then cosine decay to min_lr
learning_rate = 1e-2  # peak learning rate (high: a short run on a small model)
max_iters = 200  # optimizer steps in all
weight_decay = 0.1  # on matmul weights only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip the gradient norm to this (see stem_clip); 0: no clipping
warmup_iters = 10
lr_decay_iters = None  # the cosine ends here; None: at max_iters
min_lr = 1e-3  # ~learning_rate / 10 (Chinchilla)
# STEM tables
stem_optim = "sparse"  # "sparse": row-wise AdamW on the rows each batch touches (stem_sparse.py); "dense": plain AdamW
stem_kernel = "auto"  # "auto" | "triton" | "torch": how STEM layers read their rows (stem_ops.py)
stem_lr_mult = 1.0  # the table's learning rate is lr * stem_lr_mult (the official code: 1, the backbone's lr)
stem_weight_decay = 0.0  # table weight decay, every row every step; official: the backbone's (0.1; 0.033 at 1B)
stem_clip = "joint"  # "joint": one norm over dense and table gradients; "separate": each to grad_clip (official)
stem_dtype = "float32"  # table (and first moment) dtype: "float32" or "bfloat16" (updates rounded stochastically)
stem_state = "full"  # second moment: "full" per element, or "rowwise", one per row (sparse only)
stem_rounding = "stochastic"  # bfloat16 table: "stochastic" rounding of updates, or "nearest" (loses small ones)
stem_offload = False  # keep the table and its optimizer state in host memory (stem_offload.py); sparse only
stem_shard = False  # under torchrun: each rank owns 1/world of the table's rows and their state (stem_shard.py)
dense_offload = False  # GPU: the dense weights, gradients and AdamW state in host memory (FSDP2's CPUOffloadPolicy)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", ...
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # no float16
compile = False  # torch.compile the model (slow to start; worth it on a GPU)
plan = False  # print the memory plan (memory_plan.py) and stop, allocating nothing
plan_gpu_gb = 0.0  # with plan: a GPU's memory in GB, e.g. 80, to name the largest batch_size that fits
plan_world_size = 1  # with plan: plan one rank of this many processes (torchrun's nproc_per_node x nodes)
seed = 1337
# ----------------------------------------------------------------------------------------------------------
DEFAULTS = configurator.defaults_of(globals())
NULLABLE = {"d_ff": int, "stem_layers": list, "lr_decay_iters": int}  # keys whose default None stands for a value
CHOICES = {"init_from": ("scratch", "resume"), "stem_optim": ("sparse", "dense"), "stem_kernel": KERNELS,
           "dtype": ("float32", "bfloat16"), "stem_clip": ("joint", "separate"), "stem_dtype": ("float32", "bfloat16"),
           "stem_state": ("full", "rowwise"), "stem_rounding": ("stochastic", "nearest")}
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)]
# a resumed run takes these from its command line, never from the checkpoint
MACHINE_KEYS = ("init_from", "out_dir", "device", "dtype", "compile", "stem_kernel", "stem_offload", "stem_shard",
                "dense_offload", "plan", "plan_gpu_gb", "plan_world_size")
RUN_KEYS = ("model_args", "config", "iter_num", "best_val_loss", "rng")  # a checkpoint's entries read before the model


def configure(argv):
    """The run: every setting as an attribute, then this process's part in it (setup_distributed fills it in)."""
    settings, explicit = configurator.parse(argv, DEFAULTS, NULLABLE, __file__, __doc__, choices=CHOICES)
    return SimpleNamespace(**settings, explicit=explicit, distributed=False, rank=0, local_rank=0, world_size=1,
                           micro_steps=settings["gradient_accumulation_steps"], device_type="cpu",
                           autocast=nullcontext())


def validate(cfg):
    for key, low in dict(batch_size=1, block_size=1, gradient_accumulation_steps=1, eval_interval=1, eval_iters=1,
                         log_interval=1, max_iters=0, warmup_iters=0, seed=0, plan_world_size=1).items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"{key} must be at least {low}, got {getattr(cfg, key)}")
    if cfg.stem_layers is not None and not all(type(l) is int for l in cfg.stem_layers):
        raise ConfigError(f"stem_layers must be a list of layer numbers, got {cfg.stem_layers!r}")
    config = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})  # its own checks (ffn, stem_layers, heads), early
    for key, value in dict(stem_offload=True, stem_shard=True, stem_state="rowwise", stem_dtype="bfloat16").items():
        if getattr(cfg, key) == value and cfg.stem_optim != "sparse":
            raise ConfigError(f"{key}={value} needs stem_optim=sparse: only the row-wise optimizer has it")
    if cfg.stem_shard and not config.stem_layers:
        raise ConfigError(f"stem_shard=True splits the STEM table, but ffn={cfg.ffn} has none: drop --stem_shard")
    if not cfg.plan:  # a plan may be made for another machine
        configurator.check_device(cfg.device)


def setup_distributed(cfg):
    """Under torchrun (and for dense_offload on one process too): join the process group, pick this rank's device."""
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cfg.device_type = torch.device(cfg.device).type
    if cfg.stem_shard and not torchrun:
        raise ConfigError("stem_shard=True splits the table over torchrun's processes: run `torchrun --standalone "
                          "--nproc_per_node=N train.py ... --stem_shard=True`, or drop --stem_shard")
    if cfg.dense_offload and cfg.device_type != "cuda":
        raise ConfigError(f"dense_offload=True keeps the dense weights in host memory while a GPU computes; on "
                          f"--device={cfg.device} they are there already: drop --dense_offload")
    if torchrun:
        cfg.world_size, cfg.rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        cfg.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cfg.stem_offload and not cfg.stem_shard:
            raise ConfigError("under torchrun, stem_offload=True needs stem_shard=True (each rank keeps its part of "
                              "the table in host memory); a whole table per process would be one copy per GPU")
        if cfg.gradient_accumulation_steps % cfg.world_size:
            raise ConfigError(f"under torchrun, gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) "
                              f"must be divisible by the {cfg.world_size} processes")
    cfg.distributed = torchrun or cfg.dense_offload  # FSDP2 needs a process group, of one process too
    if cfg.distributed:
        if cfg.device_type == "cuda":
            cfg.device = f"cuda:{cfg.local_rank}"
            torch.cuda.set_device(cfg.device)
        backend = "cuda:nccl,cpu:gloo" if cfg.device_type == "cuda" else "gloo"  # gloo: offloaded shards' metadata
        dist.init_process_group(backend, **({} if torchrun else dict(store=dist.HashStore(), rank=0, world_size=1)))
    cfg.micro_steps = cfg.gradient_accumulation_steps // cfg.world_size  # this rank's share of a step
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg.autocast = nullcontext() if cfg.dtype == "float32" else torch.autocast(cfg.device_type, dtype=torch.bfloat16)


# data: random windows of the token files, drawn so that resuming and torchrun reproduce a single run's batches

def window_starts(cfg, split, stream, step, shape):
    """Offsets from (seed, stream, step) alone: a resumed run redraws step k's batch, every rank the same."""
    n = len(prepare.read_tokens(os.path.join(cfg.data_dir, cfg.dataset), split)) - cfg.block_size  # +1 for y
    return np.random.default_rng([cfg.seed, stream, step]).integers(0, n, size=shape)


def get_batch(cfg, split, starts):
    """(x on the host, x, y on the device). Ids are checked here, on the host, so the forward needs no sync."""
    data = prepare.read_tokens(os.path.join(cfg.data_dir, cfg.dataset), split)  # fresh each batch (nanoGPT)
    x = torch.from_numpy(np.stack([data[i:i + cfg.block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + cfg.block_size] for i in starts]).astype(np.int64))
    check_ids(torch.stack([x, y]), cfg.vocab_size)
    if cfg.device_type == "cuda":  # pinned host memory lets the copies run while the GPU computes
        return x, x.pin_memory().to(cfg.device, non_blocking=True), y.pin_memory().to(cfg.device, non_blocking=True)
    return x, x.to(cfg.device), y.to(cfg.device)


def micro_batches(cfg, rows_opt, step, draw=None):
    """Yields (X, Y, STEM rows or None) for every micro-step from optimizer step `step` on. The next batch is
    drawn first and its STEM rows start moving: with offload, their copy runs while this batch computes."""
    def train_batch(step, micro):  # a step draws windows for all ranks; rank r takes micro-steps r*micro_steps..
        starts = window_starts(cfg, "train", 0, step, (cfg.gradient_accumulation_steps, cfg.batch_size))
        return get_batch(cfg, "train", starts[cfg.rank * cfg.micro_steps + micro])
    draw = draw or train_batch  # draw(step, micro) -> (x_host, X, Y)
    micro, (_, X, Y) = 0, draw(step, 0)
    while True:
        rows = rows_opt.lookup(X) if rows_opt is not None else None
        step, micro = (step, micro + 1) if micro + 1 < cfg.micro_steps else (step + 1, 0)
        nxt = draw(step, micro)
        if rows_opt is not None:
            rows_opt.prefetch(nxt[1], nxt[0])  # nxt[0]: the ids on the host, which spares copying them back
        yield X, Y, rows
        _, X, Y = nxt


# model, optimizers, one step

def build_model(cfg, resuming=False):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    config, table_dtype = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}), getattr(torch, cfg.stem_dtype)
    if cfg.stem_shard:  # only this rank's rows of the table (drawn as GPT would, unless a checkpoint fills them)
        from stem_shard import sharded_gpt  # here: the module's name is also a setting's name
        model = sharded_gpt(config, cfg.rank, cfg.world_size, table_dtype, draw=not resuming)
    else:
        model = GPT(config)
        if model.stem_table is not None:
            model.stem_table.data = model.stem_table.data.to(table_dtype)
    model.stem_kernel = cfg.stem_kernel
    model.stem_table_on_host = cfg.stem_offload  # .to(device) then leaves the table in host memory
    model = model.to(cfg.device)
    if cfg.distributed:
        shard_dense(cfg, model)
    return model


def shard_dense(cfg, model):
    """FSDP2: every rank keeps 1/world of each dense weight, gradient and AdamW moment (in host memory with
    dense_offload), and gathers a block's weights only while the block computes. A sparsely trained STEM table is
    left out (ignored_params): its rows are stem_sparse's and stem_shard's to move."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    table = model.stem_table if cfg.stem_optim == "sparse" else None
    bf16 = cfg.dtype == "bfloat16"
    kwargs = dict(mesh=init_device_mesh(cfg.device_type, (cfg.world_size,)), ignored_params={table} - {None},
                  mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy(),
                  offload_policy=CPUOffloadPolicy() if cfg.dense_offload else OffloadPolicy())
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def build_optimizers(cfg, model):
    """AdamW, and for the STEM table a row-wise optimizer unless stem_optim=dense."""
    rows_opt = None
    if model.stem_table is not None and cfg.stem_optim == "sparse":
        kwargs = dict(lr_mult=cfg.stem_lr_mult, weight_decay=cfg.stem_weight_decay, betas=(cfg.beta1, cfg.beta2),
                      state=cfg.stem_state, rounding=cfg.stem_rounding, seed=cfg.seed)
        if cfg.stem_shard:  # every rank together: the row optimizers make the table's process group
            from stem_shard import ShardedOffloadedRowAdamW, ShardedRowAdamW
            sharded = ShardedOffloadedRowAdamW if cfg.stem_offload else ShardedRowAdamW
            rows_opt = sharded(model.stem_table, cfg.vocab_size, cfg.device, **kwargs)
        elif cfg.stem_offload:
            from stem_offload import OffloadedRowAdamW  # here: the module's name is also a setting's name
            rows_opt = OffloadedRowAdamW(model.stem_table, cfg.device, **kwargs)
        else:
            rows_opt = stem_sparse.SparseRowAdamW(model.stem_table, **kwargs)
    on = "cpu" if cfg.dense_offload else cfg.device_type  # where AdamW's tensors are: FSDP2 offloads them
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), on,
                                           cfg.stem_lr_mult, cfg.stem_weight_decay, cfg.stem_optim == "dense")
    return optimizer, rows_opt


def get_lr(cfg, it):
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(cfg, model, optimizer, rows_opt, batches, lr):
    """One optimizer step of cfg.micro_steps micro-batches: (mean loss, grad norm before clipping) as floats."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    loss_sum = torch.zeros((), device=cfg.device)
    for micro in range(cfg.micro_steps):
        X, Y, rows = next(batches)
        with cfg.autocast:  # (FSDP2 reduce-scatters each micro-step's gradients: none wait unsharded)
            loss, aux = model(X, Y, stem_rows=rows, return_aux=True)[1:]  # no logits alive in the backward
        ((loss + aux) / cfg.micro_steps).backward()  # MoE trains on loss + aux; reported is loss
        if rows_opt is not None:
            rows_opt.accumulate(rows)  # merged at once: what waits is one step's distinct rows
        loss_sum += loss.detach().float()
    if rows_opt is not None:
        rows_opt.sync()  # under torchrun: every rank's rows, merged and averaged
    dense = [p for g in optimizer.param_groups if not g.get("stem") for p in g["params"]]
    table = [p for g in optimizer.param_groups if g.get("stem") for p in g["params"]]  # stem_optim=dense
    if cfg.stem_clip == "separate":  # the official rule: the backbone and the tables each to grad_clip
        norm = stem_sparse.clip_grad_norm_(dense, cfg.grad_clip)
        stem_sparse.clip_grad_norm_(table, cfg.grad_clip, rows_opt)
    else:
        norm = stem_sparse.clip_grad_norm_(dense + table, cfg.grad_clip, rows_opt)
    if cfg.distributed:
        dist.all_reduce(loss_sum)  # every rank sees the same mean loss, and so stops alike
    loss, norm = loss_sum.item() / cfg.micro_steps / cfg.world_size, norm.item()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise ConfigError(f"loss {loss}, gradient norm {norm}: training diverged, stopping before the update; "
                          f"lower learning_rate. The last checkpoint in {cfg.out_dir} is untouched")
    optimizer.step()
    if rows_opt is not None:
        rows_opt.step(lr)
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


@torch.no_grad()
def estimate_loss(cfg, model, rows_opt):
    """Mean loss over eval_iters batches per split. Ranks share the batches out, so it equals one process's; each
    runs as many forwards as the busiest (FSDP's and the sharded table's exchanges need every rank), the extra ones
    repeating a batch and counting nothing."""
    model.eval()
    out = {}  # split -> mean loss
    mine = range(cfg.rank, -(-cfg.eval_iters // cfg.world_size) * cfg.world_size, cfg.world_size)
    for stream, split in enumerate(("train", "val"), start=1):  # its own windows, the same every evaluation
        total = torch.zeros((), device=cfg.device)
        for k in mine:
            _, x, y = get_batch(cfg, split, window_starts(cfg, split, stream, k % cfg.eval_iters, cfg.batch_size))
            with cfg.autocast:
                loss = model(x, y, stem_rows=rows_opt.lookup(x, grad=False) if rows_opt else None)[1].float()
            total += loss * (k < cfg.eval_iters)
        if cfg.distributed:
            dist.all_reduce(total)
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


# the log

def open_log(path, resume_iter=None):
    """write(**record) to log.jsonl, which keeps only the lines before a resumed run's first step: one run."""
    lines = open(path).readlines() if resume_iter is not None and os.path.exists(path) else []
    with open(path, "w") as f:
        f.writelines(l for l in lines if l.strip() and json.loads(l).get("iter", 0) < resume_iter)
    return lambda **record: open(path, "a").write(json.dumps(record) + "\n")


def main(argv):
    cfg = configure(argv)
    ckpt = checkpoint.load(cfg.out_dir, keys=RUN_KEYS) if cfg.init_from == "resume" else None  # small parts only
    if ckpt is not None:  # the model is the checkpoint's, and so is every setting not given again
        checkpoint.adopt_settings(cfg, ckpt, DEFAULTS, MODEL_KEYS, keep=MACHINE_KEYS)
    validate(cfg)
    if cfg.plan:
        return print(memory_plan.report(cfg))
    prepare.check_data(cfg.data_dir, cfg.dataset, cfg.block_size, cfg.vocab_size)
    setup_distributed(cfg)
    master = cfg.rank == 0
    model = build_model(cfg, resuming=ckpt is not None)  # saved as is: no compile wrapper, no _orig_mod. prefixes
    optimizer, rows_opt = build_optimizers(cfg, model)
    t0 = time.time()
    if ckpt is not None:  # every rank reads its own pieces
        checkpoint.resume_training(cfg, model, optimizer, rows_opt)
    resume_s = time.time() - t0
    start_iter, best_val_loss = (ckpt["iter_num"], ckpt["best_val_loss"]) if ckpt else (0, float("inf"))
    checkpoint.restore_rng(cfg, ckpt) if ckpt else torch.manual_seed(cfg.seed + cfg.rank)  # dropout differs by rank
    run_model = torch.compile(model) if cfg.compile else model
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), start_iter if cfg.init_from == "resume" else None)
        if ckpt is not None:
            log(iter=start_iter, resume_s=resume_s)  # how long this rank took to read the checkpoint
        elsewhere, shards = 0, ""  # a sharded model holds only this rank's rows of the table
        if cfg.stem_shard:
            elsewhere = (cfg.vocab_size - model.stem_table.size(0)) * model.stem_table.size(1)
            shards = f"; the STEM table in {cfg.world_size} shards of ~{cfg.vocab_size // cfg.world_size:,} rows"
        print(f"{model.config}\n{(model.num_params() + elsewhere) / 1e6:.1f}M parameters, "
              f"{model.active_params_per_token() / 1e6:.1f}M active per token; {tokens_per_iter:,} tokens per step on "
              f"{cfg.world_size} x {cfg.device}, {cfg.dtype}{shards}\n{memory_plan.report(cfg)}\n"
              f"starting at step {start_iter} of {cfg.max_iters}")
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True, unit="step")
    batches = micro_batches(cfg, rows_opt, start_iter)
    try:  # the bar closes before an error is printed, so the error is the last line
        for iter_num in range(start_iter, cfg.max_iters + 1):
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                losses = estimate_loss(cfg, run_model, rows_opt)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise ConfigError(f"evaluation loss is not finite at step {iter_num}: training diverged; lower "
                                      f"learning_rate. The last checkpoint in {cfg.out_dir} is untouched")
                improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
                peak = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss] * cfg.world_size  # KB on Linux
                if cfg.distributed:
                    dist.all_gather_object(peak, peak[0])
                if master:  # host memory is what STEM's tables fill: every rank's peak so far
                    log(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"], max_rss_kb=peak)
                    bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if iter_num > start_iter and (cfg.always_save_checkpoint or improved):  # the start is on disk
                    t0 = time.time()
                    checkpoint.save_training(cfg, model, optimizer, rows_opt, iter_num, best_val_loss,
                                             {k: getattr(cfg, k) for k in DEFAULTS})
                    log(iter=iter_num, checkpoint_s=time.time() - t0) if master else None
            if iter_num == cfg.max_iters:
                break
            t0, lr = time.time(), get_lr(cfg, iter_num)
            try:
                loss, _ = train_step(cfg, run_model, optimizer, rows_opt, batches, lr)
            except ConfigError as e:
                raise ConfigError(f"step {iter_num}: {e}") from None
            tps = tokens_per_iter / (time.time() - t0)
            if master and iter_num % cfg.log_interval == 0:
                log(iter=iter_num, loss=loss, lr=lr, dt_ms=tokens_per_iter / tps * 1000, tokens_per_s=tps)
                mfu = model.estimate_mfu(tps / cfg.world_size, cfg.device)  # the first steps compile: ignore them
                bar.set_postfix_str(f"loss {loss:.4f}, {tps:,.0f} tok/s, mfu {'n/a' if mfu is None else f'{mfu:.1%}'}")
            bar.update(1)
    finally:
        bar.close()
        if rows_opt is not None:
            rows_opt.close()  # an offloaded table: finish its host updates, unlock its memory, stop its worker
    if master:
        print(f"done: step {cfg.max_iters}, train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"(best {best_val_loss:.4f}); checkpoint in {cfg.out_dir}/ckpt/")


if __name__ == "__main__":
    try:
        configurator.run_main(lambda: main(sys.argv[1:]), "train.py")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
