"""
Train a GPT whose FFNs are STEM (default), SwiGLU or MoE. One process:

    python train.py                                     # a small STEM model on data/shakespeare, on a CPU
    python train.py config/train_gpt2_small_stem.py     # a preset file, then --key=value overrides
    python train.py --ffn=swiglu --max_iters=2000 --out_dir=out-swiglu

Several processes on one node (DistributedDataParallel: nccl on GPUs, gloo on CPUs):

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_small_stem.py

Every name in the settings block below is a key (configurator.py); `python train.py --help` lists them. Data
comes from data_dir/dataset/{train,val}.bin, written by `python prepare.py`. A run leaves in out_dir:
    log.jsonl  {"iter","loss","lr","dt_ms","tokens_per_s"} every log_interval steps and
               {"iter","train_loss","val_loss"} at every evaluation, one JSON object a line
    ckpt.pt    model, optimizer states, model_args, iter_num, best_val_loss, config, rng; replaced atomically
Resuming (init_from=resume) continues exactly: N steps then N more give the same losses as 2N in one go. The
model comes from the checkpoint, and so does every setting not given again (but device, dtype, compile,
stem_kernel, stem_offload: the machine's).
"""

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import configurator
import memory_plan
import stem_sparse
from configurator import ConfigError
from model import GPT, GPTConfig, check_ids
from stem_ops import KERNELS

# ----------------------------------------------------------------------------------------------------------
# settings: the defaults train a small STEM model on Shakespeare in about three minutes on two CPU cores
# I/O
out_dir = "out"  # checkpoint and log.jsonl go here
eval_interval = 100  # evaluate (and checkpoint) every this many steps, and after the last one
eval_iters = 10  # batches per split in an evaluation; the same batches every time, so evaluations compare
log_interval = 10  # write a log.jsonl line every this many steps
always_save_checkpoint = True  # save at every evaluation; False: only when val loss improves (nanoGPT's choice)
init_from = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
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
stem_clip = "joint"  # "joint": one norm over dense and table gradients; "separate": each clipped to grad_clip (official)
stem_dtype = "float32"  # table (and first moment) dtype: "float32" or "bfloat16" (updates rounded stochastically)
stem_state = "full"  # second moment: "full" per element, or "rowwise", one per row (sparse only)
stem_rounding = "stochastic"  # bfloat16 table: "stochastic" rounding of updates, or "nearest" (loses small ones)
stem_offload = False  # keep the table and its optimizer state in host memory (stem_offload.py); sparse only
# system
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", ...
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float32"
compile = False  # torch.compile the model (slow to start; worth it on a GPU)
plan = False  # print the memory plan (memory_plan.py) and stop, allocating nothing
plan_gpu_gb = 0.0  # with plan: a GPU's memory in GB, e.g. 80, to name the largest batch_size that fits
seed = 1337
# ----------------------------------------------------------------------------------------------------------
DEFAULTS = configurator.defaults_of(globals())
NULLABLE = {"d_ff": int, "stem_layers": list, "lr_decay_iters": int}  # keys whose default None stands for a value
MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig)]
MACHINE_KEYS = ("init_from", "out_dir", "device", "dtype", "compile", "stem_kernel", "stem_offload", "plan",
                "plan_gpu_gb")  # not from a ckpt
assert set(MODEL_KEYS) <= set(DEFAULTS), "every GPTConfig field must be a setting here"


def configure(argv):
    """The run: every setting as an attribute, then the facts of this process (setup_distributed)."""
    settings, explicit = configurator.parse(argv, DEFAULTS, NULLABLE, __file__, __doc__)
    return SimpleNamespace(**settings, explicit=explicit, ddp=False, rank=0, local_rank=0, world_size=1,
                           micro_steps=settings["gradient_accumulation_steps"], device_type="cpu",
                           autocast=nullcontext())


def settings_of(cfg):
    return {k: getattr(cfg, k) for k in DEFAULTS}


def validate(cfg):
    choices = {"init_from": ("scratch", "resume"), "stem_optim": ("sparse", "dense"), "stem_kernel": KERNELS,
               "dtype": ("float32", "bfloat16"), "stem_clip": ("joint", "separate"),
               "stem_dtype": ("float32", "bfloat16"), "stem_state": ("full", "rowwise"),
               "stem_rounding": ("stochastic", "nearest")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            hint = "; float16 would need loss scaling, which this trainer does not do" if key == "dtype" else ""
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {getattr(cfg, key)!r}{hint}")
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("max_iters", "warmup_iters", "seed"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    if cfg.stem_layers is not None and not all(type(l) is int for l in cfg.stem_layers):
        raise ConfigError(f"stem_layers must be a list of layer numbers, got {cfg.stem_layers!r}")
    GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS})  # its own checks (ffn, stem_layers, heads), early
    for key, value in (("stem_offload", True), ("stem_state", "rowwise"), ("stem_dtype", "bfloat16")):
        if getattr(cfg, key) == value and cfg.stem_optim != "sparse":
            raise ConfigError(f"{key}={value} needs stem_optim=sparse: only the row-wise optimizer has it")
    if not cfg.plan:  # a plan may be made for a machine that is not this one
        check_device(cfg.device)


def check_device(name):
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device=cpu")


def adopt_checkpoint(cfg, ckpt):
    """init_from=resume: the model is the checkpoint's, and settings not given again come from it too."""
    saved_model = ckpt["model_args"]
    asked = {k: getattr(cfg, k) for k in MODEL_KEYS if k in cfg.explicit}
    try:
        merged = dataclasses.asdict(GPTConfig(**{**saved_model, **asked}))  # normalised as GPTConfig does
        differ = [k for k in MODEL_KEYS if merged[k] != saved_model[k]]
    except ValueError:
        differ = [k for k in asked if asked[k] != saved_model[k]]
    if differ:
        k = differ[0]
        raise ConfigError(f"the checkpoint in {cfg.out_dir} has {k}={saved_model[k]!r} but {k}={getattr(cfg, k)!r} "
                          f"was asked for; drop --{k} to resume, or train from scratch in another out_dir")
    saved = ckpt.get("config", {})
    if "stem_optim" in cfg.explicit and saved.get("stem_optim", cfg.stem_optim) != cfg.stem_optim:
        raise ConfigError(f"the checkpoint in {cfg.out_dir} has stem_optim={saved['stem_optim']!r} but "
                          f"stem_optim={cfg.stem_optim!r} was asked for; its optimizer state cannot change kind")
    for k, v in {**saved, **saved_model}.items():
        if k in DEFAULTS and k not in cfg.explicit and k not in MACHINE_KEYS:
            setattr(cfg, k, v)


def setup_distributed(cfg):
    """Under torchrun: join the process group and pick this rank's device."""
    cfg.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.ddp:
        if cfg.stem_offload:
            raise ConfigError("stem_offload is not supported under DDP (torchrun); train in one process")
        cfg.world_size = int(os.environ["WORLD_SIZE"])
        if cfg.gradient_accumulation_steps % cfg.world_size:
            raise ConfigError(f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be divisible "
                              f"by the number of processes {cfg.world_size}")
        cfg.rank, cfg.local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
        if torch.device(cfg.device).type == "cuda":
            cfg.device = f"cuda:{cfg.local_rank}"
            torch.cuda.set_device(cfg.device)
        dist.init_process_group(backend="nccl" if torch.device(cfg.device).type == "cuda" else "gloo")
    cfg.device_type = torch.device(cfg.device).type
    cfg.micro_steps = cfg.gradient_accumulation_steps // cfg.world_size  # this rank's share of a step
    if cfg.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg.autocast = nullcontext() if cfg.dtype == "float32" else torch.autocast(cfg.device_type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# data: random windows of the token files, drawn so that resuming and DDP reproduce a single run's batches

def data_path(cfg, split):
    return os.path.join(cfg.data_dir, cfg.dataset, f"{split}.bin")


def check_data(cfg):
    for split in ("train", "val"):
        path = data_path(cfg, split)
        if not os.path.exists(path):
            raise ConfigError(f"no {split} data at {path}: run `python prepare.py` first (or prepare.py "
                              f"--input=FILE_OR_DIR --name={cfg.dataset} for your own text), or set "
                              f"--data_dir/--dataset")
        n = os.path.getsize(path) // 2
        if n <= cfg.block_size + 1:
            raise ConfigError(f"{path} holds {n} tokens, too few for block_size {cfg.block_size}: give more "
                              f"text or a smaller --block_size")
    meta_path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            data_vocab = json.load(f).get("vocab_size", 0)
        if data_vocab > cfg.vocab_size:
            raise ConfigError(f"{meta_path} says the data has {data_vocab} token ids but vocab_size is "
                              f"{cfg.vocab_size}: set --vocab_size to {data_vocab} or more (e.g. a multiple of 64)")


def window_starts(cfg, split, step, rows, stream):
    """Start offsets of `rows` windows. They depend on (seed, stream, step) alone, not on any generator state
    carried from step to step: a resumed run redraws step k's batch exactly, with nothing to checkpoint
    beyond iter_num, and every DDP rank draws the same global batch and takes its own part of it."""
    n = os.path.getsize(data_path(cfg, split)) // 2 - cfg.block_size  # a window needs block_size + 1 tokens
    return np.random.default_rng([cfg.seed, stream, step]).integers(0, n, size=rows)


def get_batch(cfg, split, starts):
    """(x on the host, x, y on the device). Ids are checked here, on the host, so the forward needs no sync."""
    # a fresh memmap per batch: numpy's memmap otherwise holds on to every page it has read (nanoGPT)
    data = np.memmap(data_path(cfg, split), dtype=np.uint16, mode="r")
    x = torch.from_numpy(np.stack([data[i:i + cfg.block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + cfg.block_size] for i in starts]).astype(np.int64))
    check_ids(torch.stack([x, y]), cfg.vocab_size)
    if cfg.device_type == "cuda":  # pinned host memory lets the copies run while the GPU computes
        return x, x.pin_memory().to(cfg.device, non_blocking=True), y.pin_memory().to(cfg.device, non_blocking=True)
    return x, x.to(cfg.device), y.to(cfg.device)


def train_batch(cfg, step, micro):
    """This rank's micro-step `micro` of optimizer step `step`: the step draws gradient_accumulation_steps x
    batch_size windows for all ranks together, and rank r takes micro-steps r*micro_steps.. of them."""
    starts = window_starts(cfg, "train", step, (cfg.gradient_accumulation_steps, cfg.batch_size), stream=0)
    return get_batch(cfg, "train", starts[cfg.rank * cfg.micro_steps + micro])


def eval_batch(cfg, split, k):
    # stream 1 + split: evaluation draws its own windows, the same at every evaluation
    return get_batch(cfg, split, window_starts(cfg, split, k, cfg.batch_size, stream=1 + ("train", "val").index(split)))


def micro_batches(cfg, rows_opt, step, draw=None):
    """Yields (X, Y, STEM rows or None) for every micro-step from optimizer step `step` on. The batch after
    the one yielded is drawn before it is returned, and its STEM rows start moving (prefetch): with offload,
    their copy to the device runs while this batch computes. draw(step, micro) -> (x_host, X, Y)."""
    draw = draw or (lambda s, m: train_batch(cfg, s, m))
    micro, nxt = 0, draw(step, 0)
    while True:
        x_host, X, Y = nxt
        if rows_opt is not None:
            rows_opt.prefetch(X, x_host) if cfg.stem_offload else rows_opt.prefetch(X)
        rows = rows_opt.lookup(X) if rows_opt is not None else None
        step, micro = (step, micro + 1) if micro + 1 < cfg.micro_steps else (step + 1, 0)
        nxt = draw(step, micro)
        if rows_opt is not None:
            rows_opt.prefetch(nxt[1], nxt[0]) if cfg.stem_offload else rows_opt.prefetch(nxt[1])
        yield X, Y, rows


# ----------------------------------------------------------------------------------------------------------
# model, optimizers, one step

def build_model(cfg, ckpt=None):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
    model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}))
    if model.stem_table is not None:
        model.stem_table.data = model.stem_table.data.to(getattr(torch, cfg.stem_dtype))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.stem_kernel = cfg.stem_kernel
    model.stem_table_on_host = cfg.stem_offload  # .to(device) then leaves the table in host memory
    return model.to(cfg.device)


def build_optimizers(cfg, model):
    """AdamW for the dense weights; the STEM table gets its own row-wise optimizer unless stem_optim=dense."""
    rows_opt = None
    if model.stem_table is not None and cfg.stem_optim == "sparse":
        kwargs = dict(lr_mult=cfg.stem_lr_mult, weight_decay=cfg.stem_weight_decay, betas=(cfg.beta1, cfg.beta2),
                      state=cfg.stem_state, rounding=cfg.stem_rounding, seed=cfg.seed)
        if cfg.stem_offload:
            from stem_offload import OffloadedRowAdamW  # here: the module's name is also a setting's name
            rows_opt = OffloadedRowAdamW(model.stem_table, cfg.device, **kwargs)
        else:
            rows_opt = stem_sparse.SparseRowAdamW(model.stem_table, **kwargs)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           cfg.device_type, stem_lr_mult=cfg.stem_lr_mult,
                                           stem_weight_decay=cfg.stem_weight_decay,
                                           include_stem_table=(cfg.stem_optim == "dense"))
    return optimizer, rows_opt


def load_optimizer_states(optimizer, rows_opt, ckpt):
    # Optimizer.load_state_dict restores the saved hyperparameters too; keep this run's (weight decay, betas,
    # lr_mult may have been changed on the command line) and take only the moments and step counts.
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, current):
        group.update(settings)
    if rows_opt is not None:
        if ckpt.get("stem_optimizer") is None:
            raise ConfigError("the checkpoint has no sparse STEM optimizer state: resume with --stem_optim=dense")
        rows_opt.load_state_dict(ckpt["stem_optimizer"])


def get_lr(cfg, it):
    decay_iters = cfg.max_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def train_step(cfg, model, optimizer, rows_opt, batches, lr):
    """One optimizer step over cfg.micro_steps micro-batches from `batches` (micro_batches()). Returns the
    mean loss and the gradient norm before clipping, as floats; a non-finite one stops before the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    loss_sum = torch.zeros((), device=cfg.device)
    for micro in range(cfg.micro_steps):
        X, Y, rows = next(batches)
        # DDP averages gradients over ranks in the backward; only the last micro-step needs that
        with model.no_sync() if cfg.ddp and micro < cfg.micro_steps - 1 else nullcontext():
            with cfg.autocast:
                _, loss, aux = model(X, Y, stem_rows=rows, return_aux=True)
            ((loss + aux) / cfg.micro_steps).backward()  # MoE trains on loss + aux; reported is loss
        if rows_opt is not None:
            rows_opt.accumulate(rows)  # merged at once: pending memory stays one step's distinct rows
        loss_sum += loss.detach().float()
    if rows_opt is not None:
        rows_opt.sync()  # under DDP: every rank's rows, merged and averaged
    dense = [p for g in optimizer.param_groups if not g.get("stem") for p in g["params"]]
    table = [p for g in optimizer.param_groups if g.get("stem") for p in g["params"]]  # stem_optim=dense
    if cfg.stem_clip == "separate":  # the official rule: the backbone and the tables each to grad_clip
        norm = stem_sparse.clip_grad_norm_(dense, cfg.grad_clip)
        stem_sparse.clip_grad_norm_(table, cfg.grad_clip, rows_opt)
    else:
        norm = stem_sparse.clip_grad_norm_(dense + table, cfg.grad_clip, rows_opt)
    loss_avg = loss_sum / cfg.micro_steps
    if cfg.ddp:
        dist.all_reduce(loss_avg)  # every rank sees the same mean loss, and so stops alike
        loss_avg /= cfg.world_size
    loss_value, norm_value = loss_avg.item(), norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm_value}"
        raise ConfigError(f"{what}: training diverged, stopping before the update; lower learning_rate. The last "
                          f"checkpoint in {cfg.out_dir} is untouched")
    optimizer.step()
    if rows_opt is not None:
        rows_opt.step(lr)
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


@torch.no_grad()
def estimate_loss(cfg, model, rows_opt):
    """Mean plain cross-entropy over eval_iters batches per split. Under DDP the ranks share the batches out
    and average, so the numbers equal a single process's."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=cfg.device)
        for k in range(cfg.rank, cfg.eval_iters, cfg.world_size):
            _, x, y = eval_batch(cfg, split, k)
            rows = rows_opt.lookup(x, grad=False) if rows_opt is not None else None
            with cfg.autocast:
                total += model(x, y, stem_rows=rows)[1].float()
        if cfg.ddp:
            dist.all_reduce(total)
        out[split] = total.item() / cfg.eval_iters
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------
# checkpoints and logs

def rng_states(cfg):
    """Every RNG the run uses (dropout draws from torch's), per rank so each can be restored exactly."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if cfg.device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(cfg.device)
    if not cfg.ddp:
        return [state]
    states = [None] * cfg.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(cfg, states, iter_num):
    if states is None or len(states) != cfg.world_size:  # another number of ranks: fresh streams for each
        torch.manual_seed(cfg.seed + 1000 * iter_num + cfg.rank)
        return
    state = states[cfg.rank]
    torch.set_rng_state(state["torch"])
    state["numpy"]["state"]["key"] = state["numpy"]["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and cfg.device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], cfg.device)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train one first (init_from=scratch), or point --out_dir at one")
    try:
        # mmap: the ranks of a DDP run share the file's pages instead of each reading a copy
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def save_checkpoint(path, ckpt):
    """Write a temporary file beside path, then rename it over path: a kill at any moment leaves either the old
    checkpoint or the new one, whole (os.replace is atomic within a filesystem)."""
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def open_log(path, resume_iter=None):
    """out_dir/log.jsonl. A resumed run first drops the lines from at or after the step it resumes from (left by
    the run that was cut short), so the log reads as one run. Returns write(**record)."""
    kept = []
    if resume_iter is not None and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("iter", 0) < resume_iter]
    with open(path, "w") as f:
        f.writelines(kept)

    def write(**record):
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return write


# ----------------------------------------------------------------------------------------------------------

def main(argv):
    cfg = configure(argv)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        adopt_checkpoint(cfg, ckpt)
    validate(cfg)
    if cfg.plan:
        print(memory_plan.report(cfg))
        return
    check_data(cfg)
    setup_distributed(cfg)
    master = cfg.rank == 0
    if master:
        print(memory_plan.report(cfg))
    model = build_model(cfg, ckpt)
    raw_model = model  # what gets saved: no torch.compile or DDP wrapper, so no _orig_mod./module. prefixes
    optimizer, rows_opt = build_optimizers(cfg, model)  # before DDP, which must not see the sparse table
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        load_optimizer_states(optimizer, rows_opt, ckpt)
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        restore_rng_states(cfg, ckpt.get("rng"), iter_num)
        ckpt = None  # the checkpoint can be as large as the model three times over: let it go
    else:
        torch.manual_seed(cfg.seed + cfg.rank)  # dropout differs across ranks; the initial weights did not
    start_iter = iter_num
    if cfg.compile:
        model = torch.compile(model)
    if cfg.ddp:
        model = DDP(model, device_ids=[cfg.local_rank] if cfg.device_type == "cuda" else None)
    eval_model = model.module if cfg.ddp else model  # evaluation skips DDP's hooks

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log = open_log(os.path.join(cfg.out_dir, "log.jsonl"), iter_num if cfg.init_from == "resume" else None)
        c = raw_model.config
        print(f"{c.ffn} model: {c.n_layer} layers, n_embd {c.n_embd}, d_ff {c.d_ff}, stem_layers {c.stem_layers}; "
              f"{raw_model.num_params() / 1e6:.1f}M parameters, {raw_model.active_params_per_token() / 1e6:.1f}M "
              f"active per token")
        print(f"{tokens_per_iter:,} tokens per step ({cfg.world_size} process(es) x {cfg.micro_steps} micro-steps "
              f"x {cfg.batch_size} x {cfg.block_size}); {cfg.device}, {cfg.dtype}, stem_optim {cfg.stem_optim}; "
              f"{'resuming at' if start_iter else 'starting at'} step {start_iter} of {cfg.max_iters}")
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master, dynamic_ncols=True, unit="step")
    batches = micro_batches(cfg, rows_opt, iter_num)
    smooth_tps = None
    try:  # the bar closes before an error is printed, so the error is the last line
        while True:
            if iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters:
                losses = estimate_loss(cfg, eval_model, rows_opt)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise ConfigError(f"evaluation loss is not finite at step {iter_num} (train {losses['train']}, val "
                                      f"{losses['val']}): training diverged; lower learning_rate. The last checkpoint "
                                      f"in {cfg.out_dir} is untouched")
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if master:
                    log(iter=iter_num, train_loss=losses["train"], val_loss=losses["val"])
                    bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                # the state a run starts from is already on disk (or is step 0): only new progress is saved
                if iter_num > start_iter and (cfg.always_save_checkpoint or improved):
                    # the row state first: it waits for an offloaded table's queued updates (and raises if one failed)
                    stem_state = rows_opt.state_dict() if rows_opt is not None else None
                    rng = rng_states(cfg)
                    if master:
                        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                            "stem_optimizer": stem_state, "model_args": dataclasses.asdict(raw_model.config),
                            "iter_num": iter_num, "best_val_loss": best_val_loss, "config": settings_of(cfg),
                            "rng": rng, "world_size": cfg.world_size})
            if iter_num >= cfg.max_iters:
                break
            t0 = time.time()
            lr = get_lr(cfg, iter_num)
            try:
                loss, _ = train_step(cfg, model, optimizer, rows_opt, batches, lr)
            except ConfigError as e:
                raise ConfigError(f"step {iter_num}: {e}") from None
            dt = time.time() - t0
            tps = tokens_per_iter / dt
            if iter_num > start_iter + 2:  # the first steps warm up (and compile); leave them out
                smooth_tps = tps if smooth_tps is None else 0.9 * smooth_tps + 0.1 * tps
            if master and iter_num % cfg.log_interval == 0:
                log(iter=iter_num, loss=loss, lr=lr, dt_ms=dt * 1000, tokens_per_s=tps)
                mfu = raw_model.estimate_mfu((smooth_tps or tps) / cfg.world_size, cfg.device)
                bar.set_postfix_str(f"loss {loss:.4f}, {smooth_tps or tps:,.0f} tok/s, "
                                    f"mfu {'n/a' if mfu is None else f'{mfu:.1%}'}")
            bar.update(1)
            iter_num += 1
    finally:
        bar.close()
    if master:
        print(f"done: step {iter_num}, train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"(best {best_val_loss:.4f}); checkpoint in {cfg.out_dir}/ckpt.pt")


def run():
    try:
        configurator.run_main(lambda: main(sys.argv[1:]), "train.py")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run()
