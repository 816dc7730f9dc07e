"""
Checkpoints: out_dir/ckpt/, a torch.distributed.checkpoint (DCP) folder. train.py writes it (save_training) and
resumes from it (resume_training); sample.py, eval.py and edit_experiment.py read it whole with load() and
load_model(). Every process of a run writes its own pieces in
parallel: its rows of a sharded STEM table and their optimizer state, its FSDP shard of the dense weights and of
their AdamW state. So no process ever holds the whole model to save it, and a run resumes on any number of
processes (DCP reshards), or on one without torchrun. The state, a nested dict:

    model           the model's state_dict by parameter name (names of the bare model: no compile prefixes)
    optimizer       the dense AdamW's, by parameter name (torch.distributed.checkpoint.state_dict's layout)
    stem_optimizer  the row optimizer's moments, step counts and decay; None with stem_optim=dense
    model_args      the GPTConfig fields, and config, every train.py setting (both as JSON: lists stay whole)
    iter_num, best_val_loss, rng (torch's generators, one entry per rank)

A save writes out_dir/ckpt.tmp/, then renames it to ckpt/ (the previous one moved to ckpt.old/ and deleted
after), so a save killed at any moment leaves a complete checkpoint: load() reads ckpt.old/ when a kill fell
between the two renames. One file instead of a folder (to copy it around, or for other tools):
    python -m torch.distributed.checkpoint.format_utils dcp_to_torch out/ckpt out/ckpt.pt
load() reads such a file too, whole (sample.py, eval.py); train.py resumes from the folder only, and
`... format_utils torch_to_dcp out/ckpt.pt out/ckpt` turns the file back into one.
"""

import dataclasses
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from configurator import ConfigError
from model import GPT, GPTConfig

NAME = "ckpt"  # out_dir/ckpt/


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save(out_dir, state):
    """Write state (this process's pieces: DTensors where sharded) as out_dir/ckpt/, atomically. Every process of
    the run calls it at once."""
    final, tmp, old = (os.path.join(out_dir, NAME + ext) for ext in ("", ".tmp", ".old"))
    if _rank() == 0:
        _recover(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    _barrier()
    state = {**state, **{k: json.dumps(state[k]) for k in ("model_args", "config") if k in state}}
    with warnings.catch_warnings():  # (one process: DCP says it assumes so)
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())  # returns once every rank's part is in
    if _rank() == 0:
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()  # no rank runs ahead (and, at the end of a run, exits) before the checkpoint is in place


def _recover(out_dir):
    """A kill between save's two renames leaves no ckpt/, and the previous checkpoint in ckpt.old/: put it back."""
    final, old = os.path.join(out_dir, NAME), os.path.join(out_dir, NAME + ".old")
    if not os.path.exists(final) and os.path.isdir(old):
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def find(path):
    """The checkpoint at path: an out_dir, a checkpoint folder, or a .pt file; a one-line error if there is none."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ".metadata")):  # an out_dir
        for name in (NAME, NAME + ".old", "ckpt.pt"):
            if os.path.exists(os.path.join(path, name, ".metadata") if name != "ckpt.pt" else os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"no checkpoint in {path}: train one with `python train.py`, or point --out_dir at one")
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}: train one with `python train.py`, or point --out_dir at one")
    return path


def exists(path):
    try:
        return bool(find(path))
    except ConfigError:
        return False


def load(path, given=None, keys=None):
    """The checkpoint at path (see find) as a nested dict on the CPU, every tensor whole. given: part of the state
    (e.g. this rank's DTensor pieces of a sharded run, or tensors already allocated): those are filled in place,
    and returned in their places, instead of being read whole. keys: read only these top-level entries."""
    path = find(path)
    try:
        if not os.path.isdir(path):
            if given is not None:
                raise ConfigError(f"{path} is one file; train.py resumes from a checkpoint folder: python -m "
                                  f"torch.distributed.checkpoint.format_utils torch_to_dcp {path} FOLDER")
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        else:
            reader = FileSystemReader(path)
            metadata = reader.read_metadata()
            state = {}
            for key, item in metadata.state_dict_metadata.items():  # everything saved, whole unless given
                where = metadata.planner_data[key]  # the key's path in the nested dict
                if keys is not None and where[0] not in keys:
                    continue
                value = _get(given, where)
                if value is None and isinstance(item, TensorStorageMetadata):
                    value = torch.empty(item.size, dtype=item.properties.dtype)
                _put(state, where, value)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from None
    if "model_args" not in state or "model" not in state and keys is None:
        raise ConfigError(f"{path} is not a stem-gpt checkpoint (no model or model_args): point --out_dir at one")
    for key in ("model_args", "config"):
        if isinstance(state.get(key), str):
            state[key] = json.loads(state[key])
    return state


def _get(tree, where):
    for k in where:
        if tree is None:
            return None
        tree = tree.get(k) if isinstance(tree, dict) else tree[k] if k < len(tree) else None
    return tree


def _put(tree, where, value):
    for k, nxt in zip(where, where[1:]):
        if isinstance(tree, list):
            tree.extend([None] * (k + 1 - len(tree)))
        if (tree[k] if isinstance(tree, list) else tree.get(k)) is None:
            tree[k] = [] if isinstance(nxt, int) else {}
        tree = tree[k]
    if isinstance(tree, list):
        tree.extend([None] * (where[-1] + 1 - len(tree)))
    tree[where[-1]] = value


def load_model(path):
    """(the GPT in path, on the CPU, in eval mode; the whole checkpoint)."""
    ckpt = load(path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    # train.py saves clean names; a checkpoint of a compiled or DDP-wrapped model (elsewhere) would carry prefixes
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


# ----------------------------------------------------------------------------------------------------------
# train.py's side: what a training run saves, and how a resumed run reads it back, piece by piece

def training_state(cfg, model, optimizer, rows_opt):
    """The model's and the optimizers' state by name, as this rank holds it: FSDP's shards and a sharded table's
    rows as DTensors (saved and loaded piece by piece). The live tensors, not copies."""
    model_state, optim_state = get_state_dict(model, optimizer)
    if cfg.stem_shard:
        from stem_shard import global_rows
        model_state["stem_table"] = global_rows(model.stem_table.detach(), cfg.vocab_size)
    return {"model": model_state, "optimizer": optim_state,
            "stem_optimizer": rows_opt.state_dict() if rows_opt is not None else None}


def save_training(cfg, model, optimizer, rows_opt, iter_num, best_val_loss, settings):
    """out_dir/ckpt/, every rank writing its own pieces. The row state comes first: it waits for an offloaded
    table's queued updates, and raises if one failed, before anything is written."""
    if rows_opt is not None:  # the saved table holds decayed rows: readers of the checkpoint need no optimizer
        rows_opt.apply_pending_decay()
    rngs = [rng_state(cfg.device_type)] * cfg.world_size  # dropout's generators, per rank
    if cfg.distributed:
        dist.all_gather_object(rngs, rngs[0])
    save(cfg.out_dir, {**training_state(cfg, model, optimizer, rows_opt), "rng": rngs, "iter_num": iter_num,
                       "model_args": dataclasses.asdict(model.config), "best_val_loss": best_val_loss,
                       "config": settings})


def resume_training(cfg, model, optimizer, rows_opt):
    """The checkpoint's weights and optimizer state into this rank's model and optimizers, read piece by piece."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = load(cfg.out_dir, training_state(cfg, model, optimizer, rows_opt))
    model_state = {k: v for k, v in state["model"].items() if not (cfg.stem_shard and k == "stem_table")}  # in
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not cfg.stem_shard))
    for group, current in zip(optimizer.param_groups, settings):  # this run's settings, the checkpoint's moments
        group.update(current)
    if rows_opt is not None:
        rows_opt.load_state_dict(state["stem_optimizer"])


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
