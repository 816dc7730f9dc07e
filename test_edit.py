"""Tests of knowledge_edit.py: STEM-row edits against hand-edited tables, the length modes, the KV cache,
the offloaded row source, and refusals. Tiny untrained models with GPT-2's vocabulary and the real tokenizer.
Then edit_experiment.py's settings and errors (not the experiment itself: it trains for minutes)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import edit_experiment
from configurator import ConfigError
from edit_experiment import swapped_embeddings
from knowledge_edit import (EditError, EditedRows, check_model, check_prompt, edited_rows, make_edits,
                            parse_edit, plan_edits, table_rows)
from model import GPT, GPTConfig, KVCache
from prepare import load_tokenizer
from stem_offload import HostRowFetcher

enc = load_tokenizer()
HERE = Path(__file__).resolve().parent


def tok(text):
    return enc.encode_ordinary(text)


def tiny(ffn="stem", seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50304, block_size=64, n_layer=3, n_head=2, n_embd=16, d_ff=32, ffn=ffn)
    model = GPT(config).eval()
    torch.manual_seed(seed)  # the weights below do not depend on how much randomness GPT's own init drew
    # unit-scale weights instead of GPT-2's small init (and xavier over 50304 rows, tinier still): an
    # untrained model then depends on its STEM rows enough for an edit to change the argmax tokens
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / p.size(1) ** 0.5 if p is not model.stem_table else 1.0)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


def logits_with(model, ids, specs, mode="one_to_one"):
    idx = torch.tensor([ids])
    rows = EditedRows(table_rows(model.stem_table), make_edits(specs, enc), mode)(idx, 0)
    with torch.no_grad():
        return model(idx, stem_rows=rows)[0][0]


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def with_rows(model, assignments):
    """A copy of model whose table row of token s is replaced by the mean of the rows of tokens ts."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for s, ts in assignments.items():
            clone.stem_table[s] = model.stem_table[list(ts)].mean(dim=0)
    return clone


# ---------------------------------------------------------------------------------------------------------
# the edit equals a hand-edited table

def test_one_to_one_equals_swapped_table_row(model):
    ids = tok("The capital of Spain is")
    spain, germany = tok(" Spain")[0], tok(" Germany")[0]
    assert germany not in ids
    first = ids.index(spain)
    plain, edited = logits_of(model, ids), logits_with(model, ids, ["Spain->Germany"])
    reference = logits_of(with_rows(model, {spain: [germany]}), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-6)
    # before the source nothing moves; from it on the edit shows
    torch.testing.assert_close(edited[:first], plain[:first], rtol=0, atol=0)
    assert (edited[first:] - plain[first:]).abs().max() > 1e-4
    # the token ids stay: this is not the same as writing Germany into the prompt
    as_germany = logits_of(model, tok("The capital of Germany is"))
    assert (edited[first:] - as_germany[first:]).abs().max() > 1e-4


def test_bare_form_at_the_start_uses_targets_bare_form(model):
    ids = tok("Spain is sunny")
    bare_spain, bare_germany = tok("Spain"), tok("Germany")
    assert len(bare_spain) == len(bare_germany) == 1 and ids[0] == bare_spain[0]
    edited = logits_with(model, ids, ["Spain->Germany"])
    reference = logits_of(with_rows(model, {bare_spain[0]: bare_germany}), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-6)


def test_every_occurrence_is_edited_and_the_text_around_is_not(model):
    ids = tok("Spain and Spain, then\nSpain again")
    spain, bare_spain = tok(" Spain")[0], tok("Spain")[0]
    assert ids.count(spain) == 1 and ids.count(bare_spain) == 2
    edited = logits_with(model, ids, ["Spain->Germany"])
    reference = logits_of(with_rows(model, {spain: tok(" Germany"), bare_spain: tok("Germany")}), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-6)


def test_several_edits_do_not_chain(model):
    ids = tok("From Spain to France by train")
    edits = make_edits(["Spain->France", "France->Italy"], enc)
    plan = plan_edits(ids, edits, "one_to_one")
    assert plan == {ids.index(tok(" Spain")[0]): tuple(tok(" France")),
                    ids.index(tok(" France")[0]): tuple(tok(" Italy"))}


# ---------------------------------------------------------------------------------------------------------
# unequal lengths: New York is 2 tokens after a space, Reykjavik 4

NY, RK = tok(" New York"), tok(" Reykjavik")


def test_lengths_of_the_entities_used_below():
    assert len(NY) == 2 and len(RK) == 4 and len(set(RK)) == 4


@pytest.mark.parametrize("mode, expect", [
    ("average", [RK, RK]),                 # both source positions read the mean of the 4 target rows
    ("left_pad", [RK[:1], RK[1:2]]),       # aligned left: the target's last two tokens are dropped
    ("right_pad", [RK[2:3], RK[3:4]]),     # aligned right: the target's first two tokens are dropped
])
def test_shorter_source(model, mode, expect):
    ids = tok("I flew from New York to Spain")
    edited = logits_with(model, ids, ["New York->Reykjavik"], mode)
    reference = logits_of(with_rows(model, dict(zip(NY, expect))), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, expect", [
    ("average", [NY, NY, NY, NY]),
    ("left_pad", [NY[:1], NY[1:], NY[1:], NY[1:]]),   # aligned left, the last target token repeats
    ("right_pad", [NY[:1], NY[:1], NY[:1], NY[1:]]),  # aligned right, the first target token repeats
])
def test_longer_source(model, mode, expect):
    ids = tok("I flew from Reykjavik to Spain")
    assert not set(NY) & set(ids)
    edited = logits_with(model, ids, ["Reykjavik->New York"], mode)
    reference = logits_of(with_rows(model, dict(zip(RK, expect))), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-5)


def test_one_to_one_refuses_unequal_lengths(model):
    with pytest.raises(EditError, match="one_to_one.*average, left_pad or right_pad"):
        logits_with(model, tok("I flew from New York to Spain"), ["New York->Reykjavik"], "one_to_one")


def test_equal_lengths_one_to_one_pairs_tokens(model):
    ids = tok("I flew from New York to Spain")
    target = tok(" Buenos Aires")
    assert len(target) == 2
    edited = logits_with(model, ids, ["New York->Buenos Aires"], "one_to_one")
    reference = logits_of(with_rows(model, {NY[0]: target[:1], NY[1]: target[1:]}), ids)
    torch.testing.assert_close(edited, reference, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the KV cache, generation, offloaded rows

def test_kv_cache_gives_the_same_tokens(model):
    prompt = torch.tensor([tok("The capital of Spain is near New York, and"), tok("In New York and Spain people like to go out")])
    for specs, mode in ((["Spain->Germany"], "one_to_one"), (["Spain->Germany", "New York->Reykjavik"], "average"),
                        (["New York->Reykjavik"], "right_pad")):
        rows = EditedRows(table_rows(model.stem_table), make_edits(specs, enc), mode, prompt_len=prompt.size(1))
        cached = model.generate(prompt, 8, temperature=0, stem_rows_fn=rows)
        uncached = model.generate(prompt, 8, temperature=0, use_cache=False, stem_rows_fn=rows)
        plain = model.generate(prompt, 8, temperature=0)
        assert torch.equal(cached, uncached)
        assert not torch.equal(cached, plain)  # the edit did something


def test_kv_cache_matches_full_forward_when_generated_text_completes_a_source(model):
    # the prompt ends in " New"; " York" arrives as a generated token. Fed one token at a time through the
    # cache, or all at once with prompt_len, every position reads the same rows: " New" its own (the span
    # did not exist when it was fed), " York" its share of the target.
    prompt, more = tok("We flew to New"), tok(" York and Spain")
    ids = torch.tensor([prompt + more])
    rows = EditedRows(table_rows(model.stem_table), make_edits(["New York->Reykjavik", "Spain->Germany"], enc),
                      "left_pad", prompt_len=len(prompt))
    with torch.no_grad():
        full = model(ids, stem_rows=rows(ids, 0))[0][0]
        cache = KVCache(model.config, 1, "cpu", torch.float32)
        steps = [model(ids[:, :len(prompt)], stem_rows=rows(ids[:, :len(prompt)], 0), kv_cache=cache)[0][0]]
        for p in range(len(prompt), ids.size(1)):
            steps.append(model(ids[:, p:p + 1], stem_rows=rows(ids[:, :p + 1], p), kv_cache=cache)[0][0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-5)
    plan = rows.plans(ids)[0]
    york = len(prompt)
    assert york - 1 not in plan and plan[york] == (RK[1],)


def test_offloaded_rows_give_the_same_logits_and_tokens(model):
    ids = torch.tensor([tok("The capital of Spain is near New York")])
    edits = make_edits(["Spain->Germany", "New York->Reykjavik"], enc)
    host = HostRowFetcher(model.stem_table.detach(), "cpu", cache_rows=4)  # tiny cache: rows get evicted
    in_memory = EditedRows(table_rows(model.stem_table), edits, "average", prompt_len=ids.size(1))
    offloaded = EditedRows(host, edits, "average", prompt_len=ids.size(1))
    with torch.no_grad():
        a = model(ids, stem_rows=in_memory(ids, 0))[0]
        b = model(ids, stem_rows=offloaded(ids, 0))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(model.generate(ids, 8, temperature=0, stem_rows_fn=in_memory),
                       model.generate(ids, 8, temperature=0, stem_rows_fn=offloaded))


def test_no_edit_in_the_window_reads_the_plain_rows(model):
    ids = torch.tensor([tok("Nothing to edit here")])
    rows = edited_rows(table_rows(model.stem_table), ids, 0, [{}])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, stem_rows=rows)[0], model(ids)[0], rtol=0, atol=0)


def test_swapping_rows_and_embeddings_together_is_swapping_the_token(model):
    # the experiment's "both" condition: STEM rows and token embedding are all a token id feeds into
    ids, as_germany = tok("The capital of Spain is"), tok("The capital of Germany is")
    idx = torch.tensor([ids])
    plans = [plan_edits(ids, make_edits(["Spain->Germany"], enc), "one_to_one")]
    with torch.no_grad(), swapped_embeddings(model, plans):
        both = model(idx, stem_rows=edited_rows(table_rows(model.stem_table), idx, 0, plans))[0][0]
    torch.testing.assert_close(both, logits_of(model, as_germany), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# refusals

@pytest.mark.parametrize("text", ["Spain", "Spain->", "->Germany", " -> ", "a->b->c", "", "Spain=>Germany"])
def test_bad_edit_strings_are_refused(text):
    with pytest.raises(EditError, match="SOURCE->TARGET"):
        parse_edit(text)


def test_parse_strips_spaces():
    assert parse_edit(" Spain -> Germany ") == ("Spain", "Germany")


def test_repeated_or_overlapping_sources_are_refused():
    with pytest.raises(EditError, match="twice"):
        make_edits(["Spain->Germany", "Spain->France"], enc)
    with pytest.raises(EditError, match="inside"):
        make_edits(["New York->Paris", "York->Rome"], enc)


def test_unknown_mode_is_refused(model):
    with pytest.raises(EditError, match="unknown edit mode"):
        EditedRows(table_rows(model.stem_table), make_edits(["Spain->Germany"], enc), "copy")


def test_source_must_be_in_the_prompt():
    edits = make_edits(["Spain->Germany"], enc)
    check_prompt(tok("The capital of Spain is"), edits, "one_to_one")
    with pytest.raises(EditError, match="'Spain' is not in the prompt"):
        check_prompt(tok("The capital of France is"), edits, "one_to_one")
    with pytest.raises(EditError, match="one_to_one"):
        check_prompt(tok("Hello New York"), make_edits(["New York->Reykjavik"], enc), "one_to_one")


def test_model_without_stem_layers_is_refused(model):
    check_model(model)
    with pytest.raises(EditError, match="STEM"):
        check_model(tiny("swiglu"))


# ---------------------------------------------------------------------------------------------------------
# edit_experiment.py: one settings block, --key=value and config files, one-line errors

def run_experiment_script(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(HERE / "edit_experiment.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_experiment_unknown_key_and_wrong_type(tmp_path):
    for args, message in ((["--bogus=1"], "unknown key --bogus; valid keys: what, json, layers, seeds, out_dir"),
                          (["--top=abc"], "top must be an int, got 'abc'"),
                          (["--reuse=yes"], "reuse must be True or False"),
                          (["--what=sprad"], "what must be one of experiment, spread"),
                          (["--edit_mode=copy"], "edit_mode must be one of one_to_one, average"),
                          (["spread"], "cannot use argument 'spread'")):  # the old subcommand
        with pytest.raises(ConfigError, match=message):
            edit_experiment.main(args)
    # from the command line: one line, exit status 1, for bad settings and for the program's own errors
    for args, message in ((["--bogus=1"], "unknown key --bogus"),
                          (["--what=spread", f"--stem_ckpt={tmp_path / 'none.pt'}"], "no checkpoint at")):
        r = run_experiment_script(*args, cwd=tmp_path)
        assert r.returncode == 1 and r.stdout == "", (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("edit_experiment.py: error: "), r.stderr
        assert message in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_experiment_help_lists_every_key_with_its_comment(tmp_path):
    r = run_experiment_script("--what=spread", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    assert "python edit_experiment.py --what=spread" in r.stdout  # the docstring first
    lines = r.stdout.splitlines()
    for key, default in edit_experiment.SETTINGS.items():
        (line,) = [l for l in lines if l.strip().startswith(f"--{key}={default!r} ")]
        assert len(line.split(None, 1)[1]) > 10, line
    assert {"what", "train_args", "top", "split", "edit_mode", "reuse", "json"} <= set(edit_experiment.SETTINGS)


def test_experiment_config_file(tmp_path):
    config = tmp_path / "spread_small.py"
    config.write_text("what = 'spread'\ntop = 16\nmax_tokens = top * 64  # a config file may compute\n"
                      "train_args = '--max_iters=10 --stem_layers=[0,1]'\n")
    opts = edit_experiment.settings([str(config), "--split=train"])
    assert (opts.what, opts.top, opts.max_tokens, opts.split) == ("spread", 16, 1024, "train")
    assert opts.train_args == "--max_iters=10 --stem_layers=[0,1]" and opts.edit_mode == "one_to_one"
    config.write_text("top = 'many'\n")
    with pytest.raises(ConfigError, match="top must be an int"):
        edit_experiment.settings([str(config)])
    config.write_text("topp = 16\n")
    with pytest.raises(ConfigError, match="sets unknown key topp"):
        edit_experiment.settings([str(config)])


def test_experiment_layers_seeds_and_facts_settings(tmp_path):
    opts = edit_experiment.settings([])
    assert (opts.layers, opts.seeds, opts.readout) == ("both", "1337,1338", "token")  # both settings, two seeds
    for args, message in ((["--seeds=abc"], "seeds must be integers separated by commas"),
                          (["--seeds=,"], "seeds must be integers"),
                          (["--n_facts=1"], "n_facts must be between 2 and 40"),
                          (["--n_facts=41"], "n_facts must be between 2 and 40"),
                          (["--layers=first"], "layers must be one of default, all, both"),
                          (["--readout=argmax"], "readout must be one of token, word")):
        with pytest.raises(ConfigError, match=message):
            edit_experiment.settings(args)
    # the layer setting and the seed name the output folders, so train_args may not set them behind our back
    for key in ("stem_layers=[0]", "seed=1", "out_dir=x"):
        with pytest.raises(EditError, match=f"train_args sets --{key.split('=')[0]}"):
            edit_experiment.main([f"--train_args=--{key}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_experiment_failed_training_is_one_line(tmp_path):
    # a bad train_args key: the corpus is written and tokenized, then train.py refuses; we say so in one line
    r = run_experiment_script("--repeats=1", "--data_dir=data", "--out_dir=out", "--train_args=--bogus_key=1",
                              cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edit_experiment.py: error: training failed: train.py exited with status 1"), last
    assert "train.py: error: unknown key --bogus_key" in r.stderr
    assert (tmp_path / "data" / "edit_experiment" / "train.bin").exists()  # relative to our working directory
    assert not (tmp_path / "out" / "ckpt").exists()


# ---------------------------------------------------------------------------------------------------------
# sample.py --edit

def save_tiny(path, ffn="stem"):
    import dataclasses
    model = tiny(ffn)
    path.mkdir()
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config)}, path / "ckpt.pt")
    return model


def run_sample(capsys, out_dir, *args):
    import sample
    sample.main([f"--out_dir={out_dir}", "--num_samples=1", "--max_new_tokens=6", "--temperature=0",
                 "--device=cpu", "--dtype=float32", *args])
    return capsys.readouterr().out.split("---------------")[0].strip("\n")


def test_sample_edit_is_the_edited_generation(tmp_path, capsys):
    model = save_tiny(tmp_path / "run")
    prompt = "The capital of Spain is near New York"
    ids = torch.tensor([tok(prompt)])
    for specs, mode in ((["Spain->Germany"], "one_to_one"), (["Spain->Germany", "New York->Reykjavik"], "left_pad")):
        rows = EditedRows(table_rows(model.stem_table), make_edits(specs, enc), mode, prompt_len=ids.size(1))
        want = enc.decode(model.generate(ids, 6, temperature=0, stem_rows_fn=rows)[0].tolist())
        flags = [f"--edit={s}" for s in specs] + [f"--edit_mode={mode}", f"--start={prompt}"]
        assert run_sample(capsys, tmp_path / "run", *flags) == want
        assert run_sample(capsys, tmp_path / "run", *flags, "--stem_offload=True") == want
    plain = enc.decode(model.generate(ids, 6, temperature=0)[0].tolist())
    assert run_sample(capsys, tmp_path / "run", f"--start={prompt}") == plain != want


def test_sample_edit_refusals(tmp_path, capsys):
    save_tiny(tmp_path / "stem")
    save_tiny(tmp_path / "swiglu", ffn="swiglu")
    cases = [("stem", ["--edit=Spain"], "SOURCE->TARGET"),
             ("stem", ["--edit=Spain->Germany", "--start=The capital of France is"], "not in the prompt"),
             ("stem", ["--edit=New York->Reykjavik", "--start=Hello New York"], "one_to_one"),
             ("stem", ["--edit=Spain->Germany", "--edit_mode=copy"], "edit_mode must be one of"),
             ("swiglu", ["--edit=Spain->Germany", "--start=The capital of Spain is"], "STEM layers")]
    for run, args, message in cases:
        with pytest.raises(ValueError, match=message):
            run_sample(capsys, tmp_path / run, *args)


def test_sample_edit_error_is_one_line_and_exit_1(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    save_tiny(tmp_path / "run")
    here = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, str(here / "sample.py"), f"--out_dir={tmp_path / 'run'}",
                             "--start=The capital of France is", "--edit=Spain->Germany", "--device=cpu"],
                            capture_output=True, text=True, cwd=here)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("sample.py: error: SOURCE 'Spain'")


# ---------------------------------------------------------------------------------------------------------
# the demo road (README, docs/editing.md): config/edit_demo.py trains STEM in every layer, tied embeddings, on 12
# facts; then sample.py edits. About 2 minutes on 2 quiet cores (600 steps); the slowest test of the suite, and the one that
# says the paper's edit works here at all.

def check_demo_run(run, model_dir, capsys):
    """What docs/editing.md promises of the demo model, from edit_experiment.py's JSON for it and sample.py."""
    assert run["stem_layers"] == [0, 1, 2, 3]  # --layers=all: layer 0 too
    rows = {(x["templates"], x["where"]): x for x in run["rows"]}
    # bounds that both seeds measured in docs/editing.md meet (1337: 100% / 97.7% flips, 1338: 88.9% / 42.9%)
    for templates, known, flips in (("training templates", 0.9, 0.8), ("held-out templates", 0.5, 0.4)):
        edit, control = rows[(templates, "stem")], rows[(templates, "wte")]
        assert edit["accuracy_before"] >= known, edit  # it knows the facts, on phrasings it never saw too
        assert edit["flip_rate"] >= flips and edit["still_a"] <= 0.1, edit  # the rows decide the answer,
        assert control["flip_rate"] <= 0.1, control  # the token embedding does not
    # through sample.py, as a user runs it: the plain prompt answers Madrid, the edited one Berlin
    prompt = "--start=The capital of Spain is"
    assert run_sample(capsys, model_dir, prompt, "--max_new_tokens=1") == "The capital of Spain is Madrid"
    edited = run_sample(capsys, model_dir, prompt, "--max_new_tokens=1", "--edit=Spain->Germany")
    assert edited == "The capital of Spain is Berlin"


def test_model_with_stem_in_layer_0_answers_the_edited_capital(tmp_path, capsys):
    r = run_experiment_script(str(HERE / "config" / "edit_demo.py"), "--out_dir=out", "--json=result.json",
                              cwd=tmp_path, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = json.loads((tmp_path / "result.json").read_text())["runs"]
    check_demo_run(run, tmp_path / "out" / "all_s1337", capsys)
