"""
Sample text from a model trained by train.py (its checkpoint in out_dir), with the KV cache.

    python sample.py                                        # out/'s checkpoint, starting from a line break
    python sample.py --start="ROMEO:" --num_samples=5 --max_new_tokens=300
    python sample.py --out_dir=out-swiglu --start=FILE:prompt.txt --temperature=0.7 --top_k=50
    python sample.py --start="The capital of Spain is" --edit="Spain->Germany" --temperature=0   # knowledge_edit.py

Settings work as in train.py (configurator.py): --key=value, config files, --help.
"""

import os
import sys
from contextlib import nullcontext

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: huge pages for big CPU tensors (see train.py)

import torch

import checkpoint
import configurator
from configurator import ConfigError
from knowledge_edit import MODES as EDIT_MODES, EditedRows, check_model, check_prompt, make_edits, table_rows
from prepare import dataset_tokenizer, load_tokenizer

# ----------------------------------------------------------------------------------------------------------
out_dir = "out"  # reads out_dir/ckpt/ (or a ckpt.pt file there; checkpoint.py)
start = "\n"  # the prompt: text, or FILE:path to read it from a file
num_samples = 3  # samples drawn, all from the same prompt
max_new_tokens = 200  # tokens generated per sample
temperature = 0.8  # 1.0: the model's own distribution; lower is more conservative; 0: always the likeliest token
top_k = 200  # sample from the k likeliest tokens only; None: from all of them
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", ...
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float16"
stem_offload = False  # leave the STEM table in host memory and fetch rows as tokens appear (stem_offload.py)
edit = ""  # "SOURCE->TARGET": where the text spells SOURCE, STEM layers read TARGET's rows; --edit may repeat
edit_mode = "one_to_one"  # SOURCE and TARGET of unequal token length: one_to_one (refuse), average, left_pad, right_pad
# ----------------------------------------------------------------------------------------------------------


def validate(cfg):
    configurator.check_device(cfg.device)
    if cfg.num_samples < 1 or cfg.max_new_tokens < 0 or cfg.temperature < 0:
        raise ConfigError("num_samples must be at least 1, max_new_tokens and temperature 0 or more")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"top_k must be at least 1, or None for no cut, got {cfg.top_k}")


def read_prompt(cfg, enc):
    text = cfg.start
    if text.startswith("FILE:"):
        try:
            with open(text[len("FILE:"):], encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the prompt file {text[len('FILE:'):]}: {e}") from None
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    if not ids:
        raise ConfigError("the prompt is empty: give --start=TEXT (or FILE:path), e.g. --start='ROMEO:'")
    return ids


def rows_source(cfg, model, enc, ids, rows_fn):
    """Where generate() gets the STEM rows of the tokens it feeds: None reads the model's own table; with
    stem_offload, rows_fn (checkpoint.load_for_inference's) brings them from host memory through a small device
    cache; --edit (knowledge_edit.py) makes the positions that spell SOURCE read TARGET's rows, taken from the
    same place as every other row."""
    if cfg.edit:
        check_model(model)
        edits = make_edits(cfg.edit, enc)
        check_prompt(ids, edits, cfg.edit_mode)
        base = rows_fn if rows_fn is not None else table_rows(model.stem_table)
        rows_fn = EditedRows(base, edits, cfg.edit_mode, prompt_len=len(ids))
    return rows_fn


def main(argv):
    cfg = configurator.configure(globals(), argv, nullable={"top_k": int}, repeatable=("edit",),
                                 choices={"dtype": ("float32", "bfloat16", "float16"), "edit_mode": EDIT_MODES})
    cfg.edit = [e for e in ([cfg.edit] if isinstance(cfg.edit, str) else cfg.edit) if e]  # a config file gives one
    validate(cfg)
    model, ckpt, rows_fn = checkpoint.load_for_inference(cfg.out_dir, cfg.device, cfg.stem_offload)
    data = ckpt.get("config", {})  # the tokenizer the training data was made with (meta.json), else GPT-2's
    enc = dataset_tokenizer(os.path.join(data.get("data_dir", "data"), data.get("dataset", ""))) or load_tokenizer()
    ckpt = None  # as large as the model: let it go
    ids = read_prompt(cfg, enc)
    if len(ids) > model.config.block_size:
        raise ConfigError(f"the prompt is {len(ids)} tokens, longer than the model's block_size "
                          f"{model.config.block_size}: shorten it")
    rows_fn = rows_source(cfg, model, enc, ids, rows_fn)
    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    autocast = nullcontext() if cfg.dtype == "float32" else torch.autocast(torch.device(cfg.device).type, dtype)
    x = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=cfg.device)  # all samples in one batch
    with torch.no_grad(), autocast:
        y = model.generate(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, stem_rows_fn=rows_fn)
    for row in y.tolist():
        print(text_of(enc, row))
        print("---------------")


def text_of(enc, ids):
    """ids as text. Ids the tokenizer has no text for (the vocabulary's padding past GPT-2's 50,257, or the gaps
    of a ranks-file tokenizer's numbering) are dropped: an untrained model may well sample them."""
    pieces = []
    for t in ids:
        try:
            pieces.append(enc.decode_single_token_bytes(t))
        except KeyError:
            pass
    return b"".join(pieces).decode("utf-8", errors="replace")


if __name__ == "__main__":
    configurator.run_main(lambda: main(sys.argv[1:]), "sample.py")
