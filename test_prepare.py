"""
Tests for prepare.py: the real GPT-2 tokenizer and real files in tmp_path, no mocks.
Run: python -m pytest -q test_prepare.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from prepare import EOT, load_tokenizer, prepare

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "prepare.py")


def read_split(out_dir, split):
    return np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)


def decode_docs(ids):
    # every document ends with EOT, so splitting on it gives the documents back
    enc = load_tokenizer()
    assert len(ids) > 0 and ids[-1] == EOT
    ends = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]


def run_script(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_clean_error(r, *words):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def make_corpus(folder, n):
    folder.mkdir()
    docs = {}
    for i in range(n):
        text = f"Document {i}: caf\u00e9, na\u00efve \u2014 \u65e5\u672c\u8a9e.\n\nSecond paragraph of doc {i}.\n" * (i + 1)
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        docs[f"doc{i:02d}.txt"] = text
    return docs


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


def test_few_documents_hold_out_the_last(tmp_path):
    docs = make_corpus(tmp_path / "small", 3)
    meta = prepare(str(tmp_path / "small"), name="tiny", out_root=str(tmp_path / "out"))
    assert meta["train_documents"] == ["doc00.txt", "doc01.txt"]
    assert meta["val_documents"] == ["doc02.txt"]
    assert decode_docs(read_split(tmp_path / "out" / "tiny", "val")) == [docs["doc02.txt"]]


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
    # the held-out works decode back to their files exactly
    import prepare as prep
    folder = prep.shakespeare_dir()
    assert decode_docs(val) == [(folder / n).read_text(encoding="utf-8") for n in val_docs]


# -----------------------------------------------------------------------------
# the script: bad inputs get one clean line and exit status 1

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


def test_unknown_key_and_wrong_type(tmp_path):
    assert_clean_error(run_script("--bogus=1", cwd=tmp_path), "unknown key --bogus",
                       "valid keys: input, name, out_dir, val_fraction")
    assert_clean_error(run_script("--inp=x.txt", cwd=tmp_path), "unknown key --inp")  # no prefix guessing
    assert_clean_error(run_script("--val_fraction=abc", cwd=tmp_path), "val_fraction must be a number", "'abc'")
    assert_clean_error(run_script("--val_fraction=1.5", cwd=tmp_path), "val_fraction must be between 0 and 1")
    assert_clean_error(run_script("notes.txt", cwd=tmp_path), "cannot use argument 'notes.txt'")
    assert not (tmp_path / "data").exists()


def test_help_lists_every_key_with_its_comment(tmp_path):
    import prepare as prep
    r = run_script("--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert "Split rule" in r.stdout  # the docstring comes first
    lines = r.stdout.splitlines()
    for key, default in prep.SETTINGS.items():
        (line,) = [l for l in lines if l.strip().startswith(f"--{key}={default!r} ")]
        assert len(line.split(None, 1)[1]) > 20, line  # a comment that explains it
    assert set(prep.SETTINGS) == {"input", "name", "out_dir", "val_fraction"}
    assert not (tmp_path / "data").exists()


def test_config_file_then_overrides(tmp_path, capsys):
    import prepare as prep
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
