"""
Checkpoints: out_dir/ckpt.pt, written by train.py and read by train.py (resume), sample.py and
edit_experiment.py. A checkpoint is a dict:

    model           the model's state_dict, from the bare model (no torch.compile or DDP prefixes)
    model_args      the GPTConfig fields, enough to rebuild the model
    optimizer       the dense AdamW's state; stem_optimizer: the row optimizer's (None for stem_optim=dense)
    iter_num, best_val_loss, config (every train.py setting), rng (torch's generators, one entry per rank)

A run with its STEM table sharded over ranks (train.py --stem_shard=True) writes the same file: rank 0 gathers the
whole table and the row optimizer's full-vocab state (stem_shard.py), and a resumed rank reads only its rows of
the memory-mapped file, so a checkpoint resumes on any number of processes.
"""

import os

import torch

from configurator import ConfigError
from model import GPT, GPTConfig


def load(path):
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train one with `python train.py`, or point --out_dir at one")
    try:  # mmap: the ranks of a DDP run share the file's pages instead of each reading a copy
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def save(path, state):
    """Write a temporary file beside path, then rename it over path: a kill at any moment leaves the old
    checkpoint or the new one, whole (os.replace is atomic within a filesystem)."""
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_model(path):
    """(the GPT in path, on the CPU, in eval mode; the whole checkpoint)."""
    ckpt = load(path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    # train.py saves clean names; a checkpoint from a compiled or DDP-wrapped model would carry prefixes
    model.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()})
    return model.eval(), ckpt


def load_for_inference(path, device, stem_offload=False):
    """(the GPT in path on device, in eval mode; the whole checkpoint; stem_rows_fn or None), for programs that
    only run the model (sample.py, eval.py). stem_offload leaves the STEM table in host memory, and the
    stem_rows_fn returned (stem_offload.HostRowFetcher) brings each forward pass's rows to the device; pass it
    as generate(stem_rows_fn=...), or as model(x, stem_rows=rows_fn(x, 0))."""
    model, ckpt = load_model(path)
    if stem_offload and model.stem_table is None:
        raise ConfigError(f"--stem_offload: the model in {path} has no STEM table (ffn={model.config.ffn})")
    model.stem_table_on_host = stem_offload  # .to(device) then leaves the table in host memory
    model = model.to(device)
    if not stem_offload:
        return model, ckpt, None
    from stem_offload import HostRowFetcher  # here: only offloading programs need its thread pool
    return model, ckpt, HostRowFetcher(model.stem_table, device)


def adopt_settings(cfg, ckpt, defaults, model_keys, keep):
    """init_from=resume: settings not given again on the command line come from the checkpoint, except those in
    keep (the machine's). What the saved state cannot change (the model, the table's optimizer) must match."""
    saved = {**ckpt.get("config", {}), **ckpt["model_args"]}
    for k in model_keys + ["stem_optim", "stem_dtype", "stem_state"]:
        if k in cfg.explicit and k in saved and getattr(cfg, k) != saved[k]:
            if k in model_keys and getattr(GPTConfig(**{**ckpt["model_args"], k: getattr(cfg, k)}), k) == saved[k]:
                continue  # the same value once normalised (e.g. stem_layers=None)
            raise ConfigError(f"the checkpoint in {cfg.out_dir} has {k}={saved[k]!r} but {k}={getattr(cfg, k)!r} "
                              f"was asked for; drop --{k} to resume, or train from scratch in another out_dir")
    for k, v in saved.items():
        if k in defaults and k not in cfg.explicit and k not in keep:
            setattr(cfg, k, v)


def rng_state(device_type):
    """torch's generators (dropout draws from them; the batches do not), to save with a checkpoint."""
    return {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {})}


def restore_rng(cfg, ckpt):
    rngs = ckpt.get("rng")
    if rngs is None or len(rngs) != cfg.world_size:  # another number of ranks: fresh streams for each
        return torch.manual_seed(cfg.seed + 1000 * ckpt["iter_num"] + cfg.rank)
    torch.set_rng_state(rngs[cfg.rank]["torch"])
    if "cuda" in rngs[cfg.rank] and cfg.device_type == "cuda":
        torch.cuda.set_rng_state(rngs[cfg.rank]["cuda"])
