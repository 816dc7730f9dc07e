"""Tests of knowledge_experiment.py: the people and facts it draws, the prompts against the corpus, the scorer on
hand-made logits whose right and wrong answers are known, the batched forward against one prompt at a time,
the one-line refusals, and a tiny experiment through the real road (prepare.py, train.py in child processes,
resumed stages, scoring, JSON, figure)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import knowledge_experiment as kx
from configurator import ConfigError
from model import GPT, GPTConfig
from prepare import load_tokenizer

enc = load_tokenizer()
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------
# the data

@pytest.mark.parametrize("n", [8, 9, 10, 13, 17, 50, 400, kx.MAX_PEOPLE])  # 13: a 4 x 4 grid, one in a last row
def test_people_are_distinct_and_every_name_is_shared(n):
    people = kx.draw_people(n, seed=3)
    assert len(people) == len(set(people)) == n
    firsts, lasts = zip(*(p.split(" ") for p in people))
    # no single name token is the person: each first and each last name belongs to two people or more
    assert min(firsts.count(f) for f in firsts) >= 2 and min(lasts.count(l) for l in lasts) >= 2
    assert all(len(enc.encode_ordinary(" " + p)) >= 2 for p in people)
    assert people == kx.draw_people(n, seed=3) and (n == kx.MAX_PEOPLE or people != kx.draw_people(n, seed=4))


def test_facts_are_drawn_from_the_lists_and_fixed_by_the_seed():
    people, facts = kx.draw_facts(50, 3, seed=0)
    assert len(facts) == 50 and all(len(row) == 3 for row in facts)
    for a, attr in enumerate(list(kx.ATTRIBUTES)[:3]):
        values = [row[a] for row in facts]
        assert set(values) <= set(kx.ATTRIBUTES[attr][0]) and len(set(values)) > 5  # drawn, not constant
    assert (people, facts) == kx.draw_facts(50, 3, seed=0) and facts != kx.draw_facts(50, 3, seed=1)[1]


def test_every_value_and_name_is_one_distinct_token():
    for attr, (values, train, held) in kx.ATTRIBUTES.items():
        kx.check_tokens(enc, values, attr)
        assert len(train) == 4 and len(held) == 2 and all(t.endswith("{v}.") for t in train + held)
    kx.check_tokens(enc, kx.FIRST_NAMES, "first names")
    kx.check_tokens(enc, kx.LAST_NAMES, "last names")
    with pytest.raises(RuntimeError, match="not one distinct"):
        kx.check_tokens(enc, ["Boston", "Reykjavik"], "cities")  # Reykjavik is 4 tokens
    with pytest.raises(RuntimeError, match="not one distinct"):
        kx.check_tokens(enc, ["Boston", "Boston"], "cities")


def test_training_prompts_are_in_the_corpus_and_held_out_ones_are_not(tmp_path):
    people, facts = kx.draw_facts(8, 2, seed=0)
    kx.write_corpus(tmp_path, people, facts, passes=10, seed=0)
    text = "".join(p.read_text() for p in sorted(tmp_path.iterdir()))
    prompts, ids = kx.make_prompts(enc, people, facts)
    assert len(ids) == 8 * 2 * 6
    for i, prompt in enumerate(ids):
        sentence = enc.decode(prompt + [int(prompts["answer"][i])]) + "."
        assert (sentence in text) != prompts["held_out"][i], sentence
        p, a = prompts["person"][i], prompts["attribute"][i]
        assert sentence.startswith("\n") and people[p] in sentence and sentence.endswith(" " + facts[p][a] + ".")


# ---------------------------------------------------------------------------------------------------------
# the scorer, on hand-made logits

def test_scorer_on_known_right_and_wrong_answers():
    people, facts = kx.draw_facts(8, 2, seed=0)
    prompts, ids = kx.make_prompts(enc, people, facts)
    P, V = len(ids), 50304
    year_ids = kx.check_tokens(enc, kx.ATTRIBUTES["birth year"][0], "birth year")
    city_ids = kx.check_tokens(enc, kx.ATTRIBUTES["birth city"][0], "birth city")
    logits = torch.zeros(P, V)
    kind = np.arange(P) % 4  # 0 right; 1 another value of the list; 2 the answer only among the values; 3 " the"
    the = enc.encode_ordinary(" the")[0]
    for i in range(P):
        answer = int(prompts["answer"][i])
        others = [t for t in (year_ids if prompts["attribute"][i] == 0 else city_ids) if t != answer]
        if kind[i] == 0:
            logits[i, answer] = 5.0
        elif kind[i] == 1:
            logits[i, answer], logits[i, others[i % len(others)]] = 4.0, 5.0
        elif kind[i] == 2:
            logits[i, answer], logits[i, the] = 4.0, 5.0  # "the" is no year or city: open wrong, choice right
        else:
            logits[i, the], logits[i, others[0]] = 5.0, 4.0  # wrong both ways
    open_ok, choice_ok = kx.score(logits, prompts, 2, enc)
    assert (open_ok == (kind == 0)).all()
    assert (choice_ok == ((kind == 0) | (kind == 2))).all()
    s = kx.summarize(prompts, open_ok, choice_ok, 2)
    trained = ~prompts["held_out"]
    assert s["recall"] == pytest.approx((kind[trained] == 0).mean())
    assert s["choice"] == pytest.approx(np.isin(kind[trained], (0, 2)).mean())
    # bits: each right answer on a training template is a quarter of a fact (4 templates) of log2(100) or log2(32)
    bits = sum(np.log2(100 if prompts["attribute"][i] == 0 else 32) / 4 for i in np.flatnonzero(trained & (kind == 0)))
    assert s["bits"] == pytest.approx(bits)


def test_all_right_is_every_bit_and_the_guesser_scores_its_share():
    people, facts = kx.draw_facts(40, 3, seed=5)
    prompts, ids = kx.make_prompts(enc, people, facts)
    logits = torch.zeros(len(ids), 50304)
    logits[torch.arange(len(ids)), torch.from_numpy(prompts["answer"])] = 1.0
    s = kx.summarize(prompts, *kx.score(logits, prompts, 3, enc), 3)
    assert s["recall"] == s["recall_held_out"] == s["choice"] == 1.0
    assert s["bits"] == pytest.approx(40 * (np.log2(100) + np.log2(32) + np.log2(16)))
    guess = kx.most_frequent_guess(prompts, facts, 3)
    shares = [max(np.unique([row[a] for row in facts], return_counts=True)[1]) / 40 for a in range(3)]
    assert guess["per_attribute"] == pytest.approx(shares)
    assert guess["recall"] == pytest.approx(np.mean(shares))


def test_batched_logits_equal_one_prompt_at_a_time():
    # unit-scale weights, so that an untrained model's argmax differs from prompt to prompt
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, block_size=32, n_layer=2, n_head=2, n_embd=16, d_ff=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if p is model.stem_table else 1 / p.size(1) ** 0.5)
    people, facts = kx.draw_facts(8, 2, seed=0)
    _, ids = kx.make_prompts(enc, people, facts)
    assert len({len(p) for p in ids}) > 2  # several lengths, so several batches
    batched = kx.next_token_logits(model, ids, batch=7)
    with torch.no_grad():
        single = torch.stack([model(torch.tensor([p]))[0][0, -1] for p in ids])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)
    assert len(set(batched.argmax(-1).tolist())) > 3


# ---------------------------------------------------------------------------------------------------------
# refusals: one line, nothing written

def run_script(*args, cwd):
    return subprocess.run([sys.executable, str(HERE / "knowledge_experiment.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--n_people=7"], "n_people must be at least 8"),
    (["--n_people=100,1601"], "more than the name lists can name"),
    (["--n_attributes=0"], "n_attributes must be between 1 and 5"),
    (["--n_attributes=6"], "n_attributes must be between 1 and 5"),
    (["--n_people=10,x"], "n_people must be positive integers"),
    (["--steps=0"], "steps must be positive integers"),
    (["--ffns=stem,dense"], "ffns: unknown 'dense'"),
    (["--seeds="], "seeds must be integers"),
    (["--curve_n=60"], "curve_n 60 is not one of n_people"),
    (["--train_args=--seed=3"], "train_args sets --seed"),
    (["--passes=0"], "passes must be at least 1"),
    (["--threads=-1"], "threads must be at least 0"),
    (["--what=figure", "--json=none.json"], "no results at none.json"),
    (["--n_layers=3"], "unknown key --n_layers"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        kx.redraw(kx.settings(args))  # settings() checks it all; not main(), which would train if it did not
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_on_the_command_line_is_one_line(tmp_path):
    r = run_script("--n_people=50,2000", cwd=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("knowledge_experiment.py: error: n_people 2000 is more than the name lists can name (40 first "
                        "x 40 last names = 1600): ask for fewer people or add names\n")
    assert list(tmp_path.iterdir()) == []


def test_name_lists_too_short_for_the_people_asked():
    kx.draw_people(9, 0, first_names=["Ann", "Bob", "Cy"], last_names=["Doe", "Roe", "Poe"])  # a 3 x 3 grid fits
    with pytest.raises(ConfigError, match="needs 4 first and 4 last names, but the lists hold 3 and 5"):
        kx.draw_people(10, 0, first_names=["Ann", "Bob", "Cy"], last_names=["Doe", "Roe", "Poe", "Lee", "Ng"])


def test_help_lists_every_key(tmp_path):
    r = run_script("--help", cwd=tmp_path)
    assert r.returncode == 0
    for key in kx.SETTINGS:
        assert f"--{key}=" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# a tiny experiment through the real road

def test_tiny_experiment_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # restored afterwards: the experiment sets it for its children
    out, data, result = tmp_path / "out", tmp_path / "data", tmp_path / "new" / "results.json"  # a folder to make
    threads = torch.get_num_threads()
    try:
        kx.main([f"--out_dir={out}", f"--data_dir={data}", f"--json={result}", "--figure=", "--n_people=8",
                 "--n_attributes=2", "--ffns=swiglu,stem_all", "--seeds=5", "--steps=2,3", "--passes=2",
                 "--train_args=--n_layer=2 --n_head=2 --n_embd=16 --block_size=16 --batch_size=2 --warmup_iters=1"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(result.read_text())
    assert [d["n_people"] for d in results["data"]] == [8] and results["curve_n"] == 8
    assert (data / "knowledge_n8_k2" / "train.bin").exists() and (data / "knowledge_n8_k2" / "val.bin").exists()
    runs = {r["label"]: r for r in results["runs"]}
    assert sorted(runs) == ["n8_stem_all_s5", "n8_swiglu_s5"]
    stem, swiglu = runs["n8_stem_all_s5"], runs["n8_swiglu_s5"]
    assert [s["steps"] for s in stem["stages"]] == [2, 3]  # scored at step 2, then resumed to step 3
    assert stem["stem_layers"] == [0, 1] and swiglu["stem_layers"] == []
    assert stem["flops_per_token"] < swiglu["flops_per_token"] and stem["params"] > swiglu["params"]
    assert stem["tokens"] == 3 * 2 * 16 and stem["model_args"]["n_embd"] == 16
    for r in runs.values():
        assert 0.0 <= r["recall"] <= 1.0 and 0.0 <= r["untrained"]["recall"] <= 1.0 and r["sightings"] > 0
        assert not checkpoint.exists(str(out / r["label"]))  # deleted once scored
        log = [json.loads(l) for l in (out / r["label"] / "log.jsonl").read_text().splitlines()]
        assert log[-1]["iter"] == 3  # train.py ran to the last stage
    printed = capsys.readouterr().out
    assert "| N | facts | sightings | swiglu | stem_all | most frequent | untrained |" in printed
    assert "recall against steps at N = 8" in printed
    # the figure from the JSON: a PNG with matplotlib; without it, one line that says how to get it
    blocked = "import sys; sys.modules['matplotlib'] = None; import knowledge_experiment as k; k.main(sys.argv[1:])"
    r = subprocess.run([sys.executable, "-c", blocked, "--what=figure", f"--json={result}",
                        f"--figure={tmp_path / 'blocked.png'}"], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pip install matplotlib" in r.stdout.splitlines()[-1]
    assert not (tmp_path / "blocked.png").exists()
    pytest.importorskip("matplotlib")
    kx.main(["--what=figure", f"--json={result}", f"--figure={tmp_path / 'k.png'}"])
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
