"""
Does a STEM edit change what a model knows? Two measurements around knowledge_edit.py's edit:

    python edit_experiment.py                  # train small STEM models on country/capital facts; flip rates
    python edit_experiment.py config/edit_demo.py    # the demo model (docs/editing.md): STEM in every layer, tied
    python edit_experiment.py --what=spread    # angular spread: STEM rows vs SwiGLU's W_up x (after the above)

experiment: 40 countries and capitals, each one GPT-2 token after a space, in 8 sentence templates (2 with the
capital first) make a corpus that prepare.py tokenizes and train.py, in a child process, learns: one model per
layer setting (default: STEM in every layer but layer 0, train.py's default and the official code's; all: every
layer, layer 0 included) and per seed, in out_dir/<layers>_s<seed>. A prompt is a template cut before the
capital ("\\nThe capital of Spain is"), from the 6 training templates with the country first and 3 held-out
ones. For each ordered pair (A, B) the prompt about A gets the edit A->B; the flip rate is how often the answer
is then B's capital, the answer being the argmax next token (readout=token) or the first word of a greedy
continuation (readout=word). Controls: B's token embedding at A's position instead of B's STEM rows, and both
at once, which equals writing B (a token id enters the model only through those).

spread: pairwise cosines between the STEM rows E_l[t] of the `top` most frequent training tokens, per STEM
layer; beside them the same for a SwiGLU model trained on the same data (here, through train.py, if it is
missing): W_up x, x the FFN input at those tokens in the first max_tokens of `split`, averaged per token (one
vector a token, like a table row) and per occurrence (up to 8 a token, pairs of different tokens only).
Independent Gaussian rows of width d_ff, a STEM table at init, are the yardstick for "near 0".
"""

import json as jsonlib
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
from configurator import ConfigError, defaults_of, parse, run_main
from knowledge_edit import MODES, EditError, EditedRows, edited_rows, make_edits, plan_edits, table_rows
from prepare import load_tokenizer, prepare, read_tokens

# ----------------------------------------------------------------------------------------------------------
# settings (--key=value or a config/*.py file)
what = "experiment"  # experiment (train, then flip rates) | spread (STEM rows vs SwiGLU W_up x)
json = ""  # also write the results here as JSON
# experiment
layers = "both"  # STEM layers of the models: default (all but layer 0, train.py's default) | all (every layer) | both
seeds = "1337,1338"  # train.py seeds, comma separated: one model per seed and layer setting
out_dir = "out/edit_experiment"  # the models train in out_dir/<layers>_s<seed>/ (default_s1337, all_s1337, ...)
data_dir = "data"  # the corpus goes to data_dir/name (train.py reads it from there)
name = "edit_experiment"  # dataset name (with fewer than 40 facts: name_<n_facts>facts)
n_facts = 40  # use the first n_facts countries (at least 2; Spain and Germany, the demo's, are the 3rd and 2nd)
repeats = 100  # shuffled passes over all the fact sentences in the corpus
readout = "token"  # the answer: token (the argmax next token) | word (first word of a 3-token greedy continuation)
edit_mode = "one_to_one"  # how unequal token lengths are handled (all entities here are one token)
reuse = False  # skip training where out_dir/<layers>_s<seed>/ holds a checkpoint
per_source = False  # also print a row per source country A
train_args = ""  # more train.py settings after ours, space separated, e.g. "--max_iters=1000 --n_embd=64"
# spread
stem_ckpt = "out/edit_experiment/default_s1337"  # the STEM model whose rows are measured (its out_dir)
swiglu_ckpt = "out/edit_experiment_swiglu"  # the SwiGLU model to compare with (its out_dir)
train_swiglu = True  # train that SwiGLU model (like the STEM one, ffn=swiglu) if its checkpoint is missing
top = 256  # this many most frequent training tokens
split = "val"  # train | val: the text whose FFN inputs x go through SwiGLU's W_up
max_tokens = 65536  # at most this many tokens of that text
# ----------------------------------------------------------------------------------------------------------
SETTINGS = defaults_of(globals())
CHOICES = {"what": ("experiment", "spread"), "layers": ("default", "all", "both"), "edit_mode": MODES,
           "readout": ("token", "word"), "split": ("train", "val")}
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------
# the experiment: a corpus of country/capital facts, a small STEM model trained on it, and flip rates

# Every country and capital here is one GPT-2 token after a space (checked by fact_tokens), so edits are
# one token for one token, and the first generated token decides the answer.
FACTS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Sweden", "Stockholm"),
    ("Norway", "Oslo"), ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Portugal", "Lisbon"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"),
    ("Afghanistan", "Kabul"), ("Pakistan", "Islamabad"), ("Thailand", "Bangkok"), ("Philippines", "Manila"),
    ("Indonesia", "Jakarta"), ("Australia", "Canberra"), ("Canada", "Ottawa"), ("Cuba", "Havana"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Ukraine", "Kiev"), ("Libya", "Tripoli"), ("Tunisia", "Tunis"),
    ("Jamaica", "Kingston"),
]
# {c} country, {k} capital. The country comes before the capital in the templates that serve as prompts
# (everything before " {k}"); the two reversed ones only train.
TRAIN_TEMPLATES = [
    "The capital of {c} is {k}.", "The capital city of {c} is {k}.", "In {c}, the seat of government is {k}.",
    "Q: What is the capital of {c}? A: {k}.", "Travellers to {c} often begin their trip in {k}.",
    "The parliament of {c} meets in {k}.", "{k} is the capital of {c}.", "{k}, the capital of {c}, is a busy city.",
]
HELD_OUT_TEMPLATES = [  # never in the corpus: do the facts (and the edits) carry over to new phrasings?
    "Everyone knows that the capital of {c} is {k}.", "As for {c}, its capital is {k}.",
    "The government of {c} is based in {k}.",
]
# train.py settings; train_args come after them, so they win. 256 tokens a step: the lm_head over 50304 tokens
# is most of a step's cost on a CPU, and 500 such steps (~36 passes over the 320 sentences) reach 100% on them.
EXPERIMENT_TRAIN_ARGS = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 32, "batch_size": 8, "max_iters": 500,
    "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_iters": 20, "eval_interval": 250, "eval_iters": 4,
    "log_interval": 10,
}


@contextmanager
def swapped_embeddings(model, plans):
    """Inside the block, model.wte gives the planned positions their targets' token embeddings (the mean for
    several tokens): the control that edits the input embedding instead of the STEM rows. Whole-sequence
    forwards only (positions are counted from 0)."""
    def hook(module, inputs, out):
        out = out.clone()
        for b, plan in enumerate(plans):
            for p, tgt in plan.items():
                out[b, p] = module.weight[list(tgt)].mean(dim=0)
        return out
    handle = model.wte.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def fact_tokens(enc, facts=FACTS):
    """[(country id, capital id)], checking that each is a single token after a space."""
    out = []
    for country, capital in facts:
        c, k = enc.encode_ordinary(" " + country), enc.encode_ordinary(" " + capital)
        if len(c) != 1 or len(k) != 1:
            raise RuntimeError(f"{country!r}/{capital!r} is not one token each after a space: {c} {k}")
        out.append((c[0], k[0]))
    if len({k for _, k in out}) != len(out):
        raise RuntimeError("two countries share a capital token")
    return out


def write_corpus(text_dir, repeats, facts=FACTS, n_files=10, seed=0):
    """repeats shuffled passes over every (fact, training template) sentence, one sentence a line, spread
    over n_files files (prepare.py holds out every 10th file as val)."""
    rng = random.Random(seed)
    sentences = [t.format(c=c, k=k) for c, k in facts for t in TRAIN_TEMPLATES]
    os.makedirs(text_dir, exist_ok=True)
    per_file = math.ceil(repeats / n_files)
    for f in range(n_files):
        lines = []
        for _ in range(per_file):
            rng.shuffle(sentences)
            lines.extend(sentences)
        with open(os.path.join(text_dir, f"facts_{f:02d}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return len(sentences) * per_file * n_files


def prompt_ids(enc, template, country, capital):
    """The template's text before " {k}", after a newline (as sentences follow one another in the corpus)."""
    ids = enc.encode_ordinary("\n" + template[:template.index(" {k}")].format(c=country))
    # the full sentence must tokenize as these very ids, then the capital's token
    full = enc.encode_ordinary("\n" + template.format(c=country, k=capital))
    assert full[:len(ids) + 1] == ids + enc.encode_ordinary(" " + capital), template
    return ids


def load_model(path, device="cpu"):
    model, ckpt = checkpoint.load_model(path)
    return model.to(device), ckpt


@torch.no_grad()
def next_token_logprobs(model, idx, plans=None, where="none"):
    """Log-probabilities of the token after each row of idx [N, T], with the edits in plans applied to the
    STEM rows ("stem"), the token embeddings ("wte"), both, or neither ("none")."""
    rows = None
    if where in ("stem", "both"):
        rows = edited_rows(table_rows(model.stem_table), idx, 0, plans)
    embed = swapped_embeddings(model, plans) if where in ("wte", "both") else nullcontext()
    with embed:
        logits, _ = model(idx, stem_rows=rows, last_only=True)
    return logits[:, -1].float().log_softmax(dim=-1)


@torch.no_grad()
def greedy_first_words(model, enc, idx, plans=None, where="none", new_tokens=3):
    """The first word of each row's greedy continuation (new_tokens tokens), with the edits in plans applied
    as in next_token_logprobs, to the prompt's positions only. The embedding swap counts positions from 0,
    so those conditions run generate without the KV cache."""
    rows_fn = None
    if where in ("stem", "both"):
        base = table_rows(model.stem_table)
        rows_fn = lambda tokens, start: edited_rows(base, tokens, start, plans)  # noqa: E731
    embed = swapped_embeddings(model, plans) if where in ("wte", "both") else nullcontext()
    with embed:
        out = model.generate(idx, new_tokens, temperature=0, use_cache=where in ("none", "stem"), stem_rows_fn=rows_fn)
    words = []
    for row in out[:, idx.size(1):].tolist():
        m = re.match(r"\s*(\w+)", enc.decode([t for t in row if t < enc.n_vocab]))
        words.append(m.group(1) if m else "")
    return words


def answers(model, enc, idx, plans, where, readout, capital_of_word):
    """[N] answers: the argmax next token (readout=token), or the capital token whose word begins the greedy
    continuation, -1 when that word is no capital (readout=word); and [N, vocab] next-token probabilities."""
    logp = next_token_logprobs(model, idx, plans, where)
    if readout == "token":
        return logp.argmax(dim=-1), logp
    words = greedy_first_words(model, enc, idx, plans, where)
    return torch.tensor([capital_of_word.get(w, -1) for w in words]), logp


def evaluate_edits(model, enc, facts=FACTS, edit_mode="one_to_one", readout="token"):
    """Accuracy before editing and, for every ordered pair (A, B), the capital the model names after A->B is
    applied to the prompts about A, and the probability it gives B's capital, under each intervention
    ("none" is the unedited model on the same prompts). Returns a dict of numpy arrays [A, B, template]."""
    ids = fact_tokens(enc, facts)
    n = len(facts)
    templates = [t for t in TRAIN_TEMPLATES if t.index("{c}") < t.index("{k}")] + HELD_OUT_TEMPLATES
    held = np.array([t in HELD_OUT_TEMPLATES for t in templates])
    capital = torch.tensor([k for _, k in ids])
    capital_of_word = {k: t for (_, k), (_, t) in zip(facts, ids)}
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    a_of, b_of = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    conditions = ("none", "stem", "wte", "both")
    answer = {w: np.zeros((n, n, len(templates)), dtype=np.int64) for w in conditions}
    p_target = {w: np.zeros((n, n, len(templates))) for w in conditions}
    for j, template in enumerate(templates):
        prompts = torch.tensor([prompt_ids(enc, template, c, k) for c, k in facts])
        # unedited: one pass over the n prompts serves every pair
        ans, logp = answers(model, enc, prompts, None, "none", readout, capital_of_word)
        answer["none"][:, :, j] = ans[:, None].expand(n, n).numpy()
        p_target["none"][:, :, j] = logp[:, capital].exp().numpy()
        # every ordered pair (a, b), a != b, in one batch: the prompt about a, the edit a->b
        idx = prompts[a_of]
        plans = [plan_edits(row, make_edits([f"{facts[a][0]}->{facts[b][0]}"], enc), edit_mode)
                 for row, (a, b) in zip(idx.tolist(), pairs)]
        assert all(len(p) == 1 for p in plans), "each prompt names its country once"
        for where in conditions[1:]:
            ans, logp = answers(model, enc, idx, plans, where, readout, capital_of_word)
            answer[where][a_of, b_of, j] = ans.numpy()
            p_target[where][a_of, b_of, j] = logp.gather(1, capital[b_of, None])[:, 0].exp().numpy()
    before = answer["none"][:, 0, :] == capital.numpy()[:, None]
    return {"templates": templates, "held_out": held, "before": before, "capital": capital.numpy(),
            "answers": answer, "p_target": p_target, "facts": list(facts)}


def summarize(ev):
    """Flip rates per intervention and template group, as rows of a table."""
    capital, before, held = ev["capital"], ev["before"], ev["held_out"]
    off = ~np.eye(len(capital), dtype=bool)  # ordered pairs a != b
    rows = []
    for group, cols in (("training templates", ~held), ("held-out templates", held)):
        for where, label in (("stem", "STEM rows (the edit)"), ("wte", "token embedding (control)"),
                             ("both", "both (= writing B)")):
            ans = ev["answers"][where][:, :, cols]  # [a, b, template]
            to_b, to_a = ans == capital[None, :, None], ans == capital[:, None, None]
            # the prompts where the model knew both facts before: A's under that template, and B's
            known = before[:, None, cols] & before[None, :, cols]
            rows.append({
                "templates": group, "intervention": label, "where": where,
                "accuracy_before": float(before[:, cols].mean()),
                "flip_rate": float(to_b[off].mean()),
                "flip_rate_known": float(to_b[off][known[off]].mean()) if known[off].any() else float("nan"),
                "still_a": float(to_a[off].mean()), "other": float((~to_b & ~to_a)[off].mean()),
                "p_b_before": float(ev["p_target"]["none"][:, :, cols][off].mean()),
                "p_b_after": float(ev["p_target"][where][:, :, cols][off].mean()),
                "n_prompts": int(off.sum() * cols.sum()),
            })
    return rows


def markdown_table(rows):
    head = ("| templates | intervention | accuracy before | flip rate A->B | flip rate, both known | still A | "
            "neither capital | p(B's capital) before -> after | edited prompts |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['templates']} | {r['intervention']} | {r['accuracy_before']:.1%} | {r['flip_rate']:.1%} | "
                     f"{r['flip_rate_known']:.1%} | {r['still_a']:.1%} | {r['other']:.1%} | "
                     f"{r['p_b_before']:.3f} -> {r['p_b_after']:.3f} | {r['n_prompts']} |")
    return "\n".join(lines)


LAYER_NAMES = {"default": "1-{last} (default)", "all": "0-{last} (every layer)"}


def comparison_table(runs):
    """One line per model and template group: the STEM edit beside the embedding-swap control; then the mean
    over seeds of each layer setting."""
    lines = ["| STEM layers | seed | templates | accuracy before | flip rate, STEM edit | embedding swap (control) | "
             "STEM edit: neither capital | STEM edit: still A |", "|" + "---|" * 8]

    def line(layers, seed, group, rows):
        get = lambda where, key: np.mean([r[key] for r in rows if r["where"] == where])  # noqa: E731
        lines.append(f"| {layers} | {seed} | {group} | {get('stem', 'accuracy_before'):.1%} | "
                     f"{get('stem', 'flip_rate'):.1%} | {get('wte', 'flip_rate'):.1%} | {get('stem', 'other'):.1%} | "
                     f"{get('stem', 'still_a'):.1%} |")

    for setting in dict.fromkeys(r["layers"] for r in runs):
        mine = [r for r in runs if r["layers"] == setting]
        label = LAYER_NAMES[setting].format(last=mine[0]["n_layer"] - 1)
        for group in ("training templates", "held-out templates"):
            for r in mine:
                line(label, r["seed"], group, [x for x in r["rows"] if x["templates"] == group])
            if len(mine) > 1:
                line(label, "mean", group, [x for r in mine for x in r["rows"] if x["templates"] == group])
    return "\n".join(lines)


def per_source_table(ev):
    """Per country A: accuracy before, and the STEM / embedding flip rates averaged over the targets B."""
    cap, held, off = ev["capital"], ev["held_out"], ~np.eye(len(ev["capital"]), dtype=bool)
    lines = ["| A | accuracy before (train / held-out) | STEM flip | embedding flip |", "|---|---|---|---|"]
    for a, (country, _) in enumerate(ev["facts"]):
        stem, wte = [(ev["answers"][w][a] == cap[:, None])[off[a]].mean() for w in ("stem", "wte")]  # [b, template]
        lines.append(f"| {country} | {ev['before'][a, ~held].mean():.0%} / {ev['before'][a, held].mean():.0%} | "
                     f"{stem:.0%} | {wte:.0%} |")
    return "\n".join(lines)


def run_train(args, extra=()):
    """Train with train.py in a child process, never a copy of its loop: the settings in the dict args, then
    the --key=value texts in extra, which win. Returns the seconds it took."""
    cmd = [sys.executable, os.path.join(HERE, "train.py")] + [f"--{k}={v}" for k, v in args.items()] + list(extra)
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd).returncode  # in our working directory: relative paths mean the same to both
    if rc != 0:
        raise EditError(f"training failed: train.py exited with status {rc} (its own error is above)")
    return time.time() - t0


def extra_train_args(opts):
    """train_args as a list, and the n_layer the models get. --stem_layers and --seed there are refused:
    --layers and --seeds say them, and the output folders are named after those."""
    extra = shlex.split(opts.train_args)
    keys = {a[2:].partition("=")[0]: a.partition("=")[2] for a in extra if a.startswith("--")}
    for key, instead in (("stem_layers", "--layers=default|all|both"), ("seed", "--seeds=S1,S2"),
                         ("out_dir", "--out_dir"), ("dataset", "--name")):
        if key in keys:
            raise EditError(f"train_args sets --{key}; give {instead} to edit_experiment.py instead")
    try:
        n_layer = int(keys.get("n_layer", EXPERIMENT_TRAIN_ARGS["n_layer"]))
    except ValueError:
        raise EditError(f"train_args: --n_layer must be an int, got {keys['n_layer']!r}") from None
    return extra, n_layer


def write_data(opts, facts):
    """Write the corpus and tokenize it with prepare.py; returns the dataset's name."""
    dataset = opts.name if len(facts) == len(FACTS) else f"{opts.name}_{len(facts)}facts"
    text_dir = os.path.join(opts.data_dir, dataset + "_text")
    n = write_corpus(text_dir, opts.repeats, facts)
    print(f"corpus: {len(facts)} countries x {len(TRAIN_TEMPLATES)} templates, {n:,} sentences in {text_dir}")
    prepare(input_path=text_dir, name=dataset, out_root=opts.data_dir)
    return dataset


def parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise ConfigError(f"seeds must be integers separated by commas, e.g. --seeds=1337,1338, got {text!r}")
    return seeds


def experiment(opts):
    t_start = time.time()
    enc = load_tokenizer()
    facts = FACTS[:opts.n_facts]
    fact_tokens(enc, facts)
    extra, n_layer = extra_train_args(opts)
    settings_ = ["default", "all"] if opts.layers == "both" else [opts.layers]
    dataset, runs = None, []
    for setting in settings_:
        for seed in parse_seeds(opts.seeds):
            run_dir = os.path.join(opts.out_dir, f"{setting}_s{seed}")
            ckpt_path = run_dir
            train_s = None
            if not (opts.reuse and checkpoint.exists(ckpt_path)):
                dataset = dataset or write_data(opts, facts)
                args = dict(EXPERIMENT_TRAIN_ARGS, out_dir=run_dir, data_dir=opts.data_dir, dataset=dataset,
                            ffn="stem", seed=seed)
                if setting == "all":
                    args["stem_layers"] = str(list(range(n_layer))).replace(" ", "")
                train_s = run_train(args, extra)
            runs.append(evaluate_run(opts, enc, facts, setting, seed, ckpt_path, train_s))
    print(f"\n## {len(facts)} countries, readout {opts.readout}, flip rate: after A->B the answer is B's capital\n")
    print(comparison_table(runs))
    print(f"\ntime: total {time.time() - t_start:.0f}s")
    write_json(opts.json, {"runs": runs, "facts": facts, "readout": opts.readout})


def evaluate_run(opts, enc, facts, setting, seed, ckpt_path, train_s):
    model, ckpt = load_model(ckpt_path)
    t_eval = time.time()
    ev = evaluate_edits(model, enc, facts, opts.edit_mode, opts.readout)
    eval_s = time.time() - t_eval
    rows = summarize(ev)
    c = model.config
    print(f"\n### {ckpt_path}: ffn {c.ffn}, {c.n_layer} layers, n_embd {c.n_embd}, d_ff {c.d_ff}, stem_layers "
          f"{c.stem_layers}, {ckpt['iter_num']} steps, val loss {ckpt['best_val_loss']:.4f}; {len(facts)} countries, "
          f"edit_mode {opts.edit_mode}, readout {opts.readout}\n")
    print(markdown_table(rows))
    if opts.per_source:
        print("\n" + per_source_table(ev))
    print()
    if {"Spain", "Germany"} <= {c for c, _ in facts}:
        demo(model, enc, "Spain", "Germany")  # the paper's example
    print(f"time: train {'(reused)' if train_s is None else f'{train_s:.0f}s'}, evaluation {eval_s:.1f}s")
    return {"layers": setting, "seed": seed, "ckpt": ckpt_path, "n_layer": c.n_layer, "stem_layers": c.stem_layers,
            "rows": rows, "templates": ev["templates"], "held_out": ev["held_out"].tolist(),
            "accuracy_before": ev["before"].tolist(), "answers": {w: a.tolist() for w, a in ev["answers"].items()},
            "p_target": {w: a.round(5).tolist() for w, a in ev["p_target"].items()},
            "model_args": ckpt["model_args"], "val_loss": ckpt["best_val_loss"], "train_s": train_s, "eval_s": eval_s}


def write_json(path, results):
    """Write results to path through a temporary file: an interrupted run leaves the old file whole."""
    if path:
        with open(path + ".tmp", "w") as f:
            jsonlib.dump(results, f)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")


@torch.no_grad()
def demo(model, enc, source, target):
    """What `sample.py --start="The capital of Spain is" --edit=Spain->Germany --temperature=0` prints: greedy
    continuations with and without the edit, through GPT.generate and its KV cache."""
    ids = torch.tensor([enc.encode_ordinary(f"The capital of {source} is")])
    rows = EditedRows(table_rows(model.stem_table), make_edits([f"{source}->{target}"], enc), "one_to_one",
                      prompt_len=ids.size(1))
    plain, edited = model.generate(ids, 4, temperature=0), model.generate(ids, 4, temperature=0, stem_rows_fn=rows)
    show = lambda out: repr(enc.decode(out[0, ids.size(1):].tolist()))  # noqa: E731
    print(f"'The capital of {source} is' -> {show(plain)};  with {source}->{target}: {show(edited)}")


# ----------------------------------------------------------------------------------------------------------
# angular spread: pairwise cosines of STEM rows vs SwiGLU up-projection outputs, for frequent tokens

def cosine_stats(vectors, labels=None):
    """Summary of the pairwise cosines between rows of vectors [N, d]; with labels, only pairs whose labels
    differ (occurrences of different tokens)."""
    u = F.normalize(vectors.double(), dim=1)
    cos = u @ u.T
    i, j = torch.triu_indices(len(u), len(u), offset=1)
    c = cos[i, j]
    if labels is not None:
        c = c[labels[i] != labels[j]]
    a = c.abs()
    q = torch.tensor([0.05, 0.5, 0.95], dtype=c.dtype)
    cq, aq = torch.quantile(c, q).tolist(), torch.quantile(a, q).tolist()
    return {"pairs": int(c.numel()), "cos_mean": c.mean().item(), "cos_std": c.std().item(),
            "cos_p5": cq[0], "cos_p50": cq[1], "cos_p95": cq[2],
            "abs_mean": a.mean().item(), "abs_std": a.std().item(), "abs_p50": aq[1], "abs_p95": aq[2]}


def frequent_tokens(folder, top):
    """The top most frequent token ids of folder's train split, most frequent first."""
    counts = np.bincount(read_tokens(folder, "train"))
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0][:top]
    return torch.from_numpy(order.astype(np.int64))


@torch.no_grad()
def up_projections(model, tokens, text, per_token_occurrences=8):
    """For each layer whose FFN has a W_up: (per-token mean of W_up x over the token's occurrences in text,
    a sample of per-occurrence W_up x with their token labels). x is the FFN's input (after ffn_norm)."""
    bs = model.config.block_size
    wanted = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    wanted[tokens] = torch.arange(len(tokens))
    layers = [l for l, b in enumerate(model.blocks) if hasattr(b.ffn, "w_up")]
    d = model.config.d_ff
    sums = {l: torch.zeros(len(tokens), d, dtype=torch.float64) for l in layers}
    counts = torch.zeros(len(tokens), dtype=torch.float64)
    samples = {l: [] for l in layers}
    sample_labels, seen = [], torch.zeros(len(tokens), dtype=torch.long)
    captured = {}
    hooks = [model.blocks[l].ffn.register_forward_pre_hook(
        lambda m, inp, l=l: captured.__setitem__(l, m.w_up(inp[0]))) for l in layers]
    try:
        for s in range(0, len(text) - bs + 1, bs):
            chunk = torch.from_numpy(text[s:s + bs].astype(np.int64))[None]
            model(chunk, last_only=True)  # only the FFN inputs matter; skip most of lm_head
            slot = wanted[chunk[0]]
            keep = slot >= 0
            counts.index_add_(0, slot[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
            # the first few occurrences of each token, for the per-occurrence statistic
            take = []
            for t in keep.nonzero().flatten().tolist():
                if seen[slot[t]] < per_token_occurrences:  # counted one by one: a window may repeat a token
                    seen[slot[t]] += 1
                    take.append(t)
            sample_labels += slot[take].tolist()
            for l in layers:
                up = captured[l][0].double()
                sums[l].index_add_(0, slot[keep], up[keep])
                if take:
                    samples[l].append(up[take])
    finally:
        for h in hooks:
            h.remove()
    present = counts > 0
    means = {l: (sums[l][present] / counts[present, None]) for l in layers}
    occ = {l: torch.cat(samples[l]) if samples[l] else torch.zeros(0, d) for l in layers}
    return means, occ, torch.tensor(sample_labels), int(present.sum())


def spread_table(rows):
    lines = ["| model | layer | vectors | pairs | mean cos | std cos | p5 / p50 / p95 cos | mean abs(cos) | "
             "std abs(cos) | p50 / p95 abs(cos) |", "|" + "---|" * 10]
    for r in rows:
        s = r["stats"]
        lines.append(f"| {r['model']} | {r['layer']} | {r['vectors']} | {s['pairs']} | {s['cos_mean']:.3f} | "
                     f"{s['cos_std']:.3f} | {s['cos_p5']:.3f} / {s['cos_p50']:.3f} / {s['cos_p95']:.3f} | "
                     f"{s['abs_mean']:.3f} | {s['abs_std']:.3f} | {s['abs_p50']:.3f} / {s['abs_p95']:.3f} |")
    return "\n".join(lines)


def swiglu_args_from(ckpt, out_dir):
    """train.py settings that train a SwiGLU twin of a STEM checkpoint: same data, sizes and schedule."""
    cfg, model_args = ckpt["config"], ckpt["model_args"]
    keep = ("data_dir", "dataset", "batch_size", "block_size", "gradient_accumulation_steps", "n_layer",
            "n_head", "n_embd", "learning_rate", "max_iters", "weight_decay", "warmup_iters", "min_lr",
            "eval_interval", "eval_iters", "log_interval", "seed")
    args = {k: cfg[k] for k in keep if k in cfg}
    args.update(d_ff=model_args["d_ff"], ffn="swiglu", out_dir=out_dir)
    return args


def spread(opts):
    t0 = time.time()
    stem, stem_ckpt = load_model(opts.stem_ckpt)
    if stem.stem_table is None:
        raise EditError(f"{opts.stem_ckpt} has no STEM layers (ffn={stem.config.ffn!r})")
    if not checkpoint.exists(opts.swiglu_ckpt):
        if not opts.train_swiglu:
            raise EditError(f"no SwiGLU checkpoint at {opts.swiglu_ckpt}; train one with train.py --ffn=swiglu on "
                            f"the same data, or set --train_swiglu=True")
        print(f"{opts.swiglu_ckpt} is missing: training a SwiGLU model like {opts.stem_ckpt}")
        run_train(swiglu_args_from(stem_ckpt, opts.swiglu_ckpt))
    swiglu, swiglu_ckpt = load_model(opts.swiglu_ckpt)
    if swiglu.config.ffn != "swiglu":
        raise EditError(f"{opts.swiglu_ckpt} is not a SwiGLU model (ffn={swiglu.config.ffn!r})")
    data = os.path.join(stem_ckpt["config"]["data_dir"], stem_ckpt["config"]["dataset"])  # the STEM model's data
    tokens = frequent_tokens(data, opts.top)
    text = read_tokens(data, opts.split)[:opts.max_tokens]
    rows = []
    c = stem.config
    for slot, layer in enumerate(c.stem_layers):
        table = stem.stem_table.detach()[tokens, slot * c.d_ff:(slot + 1) * c.d_ff]
        rows.append({"model": "STEM rows E_l[t]", "layer": layer, "vectors": len(tokens), "stats": cosine_stats(table)})
    means, occ, labels, present = up_projections(swiglu, tokens, np.asarray(text))
    for layer in means:
        rows.append({"model": "SwiGLU W_up x, mean per token", "layer": layer, "vectors": present,
                     "stats": cosine_stats(means[layer])})
    for layer in occ:
        rows.append({"model": "SwiGLU W_up x, per occurrence (<=8/token)", "layer": layer,
                     "vectors": len(labels), "stats": cosine_stats(occ[layer], labels)})
    # the yardstick for "near 0": independent Gaussian rows of the same width, as the xavier init draws them
    g = torch.Generator().manual_seed(0)
    rows.append({"model": "random Gaussian rows (STEM at init)", "layer": "-", "vectors": len(tokens),
                 "stats": cosine_stats(torch.randn(len(tokens), c.d_ff, generator=g))})
    print(f"STEM: {opts.stem_ckpt} (stem_layers {c.stem_layers}, d_ff {c.d_ff}); SwiGLU: {opts.swiglu_ckpt} "
          f"(d_ff {swiglu.config.d_ff})")
    print(f"tokens: the {len(tokens)} most frequent in {data}/train.bin; SwiGLU x from the first "
          f"{len(text):,} tokens of {opts.split}.bin ({present} of those tokens occur there), "
          f"in windows of block_size {swiglu.config.block_size}\n")
    print(spread_table(rows))
    print(f"\ntime: {time.time() - t0:.0f}s")
    write_json(opts.json, {"rows": rows, "tokens": tokens.tolist()})


# ----------------------------------------------------------------------------------------------------------

def settings(argv=None):
    """The settings above, then config files and --key=value from argv (sys.argv by default)."""
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, prog=__file__, doc=__doc__)
    for key, choices in CHOICES.items():
        if s[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {s[key]!r}")
    if not 2 <= s["n_facts"] <= len(FACTS):
        raise ConfigError(f"n_facts must be between 2 and {len(FACTS)} (the countries in FACTS), got {s['n_facts']}")
    parse_seeds(s["seeds"])
    return SimpleNamespace(**s)


def main(argv=None):
    opts = settings(argv)
    if opts.what == "experiment":
        experiment(opts)
    else:
        spread(opts)


if __name__ == "__main__":
    run_main(main, "edit_experiment.py")
