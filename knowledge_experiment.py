"""
How many facts does a model store and recall? STEM against SwiGLU and MoE on synthetic biographies, after the
"Physics of Language Models" knowledge studies (Allen-Zhu and Li, parts 3.1 and 3.3), at laptop scale:

    python knowledge_experiment.py                   # all of it: table, JSON, figure (results: docs/knowledge.md)
    python knowledge_experiment.py --what=figure     # the figure again from the JSON (needs matplotlib)
    python knowledge_experiment.py --n_people=40 --ffns=stem,swiglu --seeds=1 --steps=300   # a quick probe

data: N fictional people, each named by a first and a last name from common-name lists (every name shared by
at least two people, so no single token is the person), with K attributes drawn at random (data_seed) from
fixed lists: birth year, birth city, university, employer, field. Each fact is a sentence in each of 4 training
templates; the corpus is `passes` shuffled passes over all those sentences, one a line, which prepare.py
tokenizes and train.py, in a child process, learns. Every value is one GPT-2 token after a space (checked), so
scoring the first token of the answer is exact match.

models: the same backbone (EXPERIMENT_TRAIN_ARGS: layers, width, heads, block size, d_ff) and the same tokens
and steps for every FFN: swiglu, moe (8 experts, top 2), stem (the official layout, every layer but layer 0)
and stem_all (every layer). d_ff is held equal, so STEM does fewer FLOPs per token, as in the paper.

recall: the prompt is a template cut before the answer ("\\nMary Smith was born in"), from the 4 training
templates and 2 held-out ones; open recall: the argmax over the whole vocabulary is the answer's token;
choice recall: the argmax among the attribute's values. bits: correct open answers x log2(the list's size).
Chance on the page: each model untrained (train.py's initial weights), and a guesser that always answers each
attribute's most frequent value. Checkpoints after each of `steps` (resumed runs, one schedule) give recall
against steps; the last one gives recall against N.
"""

import json as jsonlib
import math
import os
import random
import resource
import shlex
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import checkpoint
from configurator import ConfigError, defaults_of, parse, run_main
from edit_experiment import parse_seeds, run_train, write_json
from model import GPT, GPTConfig
from prepare import load_tokenizer, prepare

# ----------------------------------------------------------------------------------------------------------
# settings (--key=value or a config/*.py file)
what = "experiment"  # experiment (train, score, table, JSON, figure) | figure (redraw the figure from json)
json = "out/knowledge/results.json"  # the results as JSON (the figure is drawn from it)
figure = "out/knowledge/knowledge.png"  # the figure's PNG ("" for none); needs matplotlib
n_people = "8,16,32"  # N: the numbers of people, comma separated: one corpus and one model per FFN and seed each
n_attributes = 4  # K: the first K of birth year, birth city, university, employer, field
ffns = "swiglu,moe,stem,stem_all"  # the FFNs compared: swiglu | moe | stem (all layers but 0) | stem_all
seeds = "1337,1338"  # train.py seeds, comma separated: one model per seed, N and FFN
steps = "80,160,240"  # checkpoints scored at these steps (the last is the run's length; the lr schedule spans it)
curve_n = 0  # the N whose models are scored at every entry of steps (recall against steps); 0: the smallest N
data_seed = 0  # draws the names and the facts (the same data for every seed)
passes = 10  # shuffled passes over all training sentences in the corpus (train.py draws random windows of it)
out_dir = "out/knowledge"  # models go to out_dir/n<N>_<ffn>_s<seed>/
data_dir = "data"  # corpora go to data_dir/<name>_n<N>_k<K>/ (train.py reads them from there)
name = "knowledge"  # the datasets' name prefix
threads = 1  # torch threads in each train.py child (OMP_NUM_THREADS) and here; 0: torch's default (all cores)
keep_checkpoints = False  # keep each run's checkpoint (a STEM one is ~0.9 GB); False: delete it once scored
train_args = ""  # more train.py settings after ours, space separated, e.g. "--learning_rate=3e-3"
# ----------------------------------------------------------------------------------------------------------
SETTINGS = defaults_of(globals())
HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------------
# the data: people, their facts, the sentences that state them, and the prompts that ask for them

# Every name and value is one GPT-2 token after a space (checked by check_tokens).
FIRST_NAMES = ("James Mary John Patricia Robert Jennifer Michael Linda William Elizabeth David Barbara Richard Susan "
               "Joseph Jessica Thomas Sarah Charles Karen Christopher Nancy Daniel Lisa Matthew Betty Anthony "
               "Margaret Mark Sandra Donald Ashley Steven Kimberly Paul Emily Andrew Donna Joshua Michelle").split()
LAST_NAMES = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez "
              "Wilson Anderson Green Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark "
              "Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores").split()
# attribute: (values, 4 training templates, 2 held-out templates); {p} the person, {v} the value, always last
ATTRIBUTES = {
    "birth year": (
        [str(y) for y in range(1900, 2000)],
        ["{p} was born in {v}.", "{p} was born in the year {v}.", "The birth year of {p} is {v}.",
         "{p} came into the world in {v}."],
        ["{p}'s year of birth is {v}.", "Records show that {p} was born in {v}."]),
    "birth city": (
        ("Boston Chicago Denver Seattle Houston Dallas Atlanta Miami Phoenix Detroit Portland Austin London Paris "
         "Berlin Madrid Rome Vienna Dublin Oslo Tokyo Sydney Toronto Cairo Lima Moscow Athens Prague Warsaw Lisbon "
         "Stockholm Helsinki").split(),
        ["{p} was born in the city of {v}.", "{p}'s hometown is {v}.", "{p} grew up in {v}.",
         "The birthplace of {p} is {v}."],
        ["{p} spent a childhood in {v}.", "{p} is a native of {v}."]),
    "university": (
        ("Harvard Stanford Yale Princeton Oxford Cambridge Berkeley Columbia Cornell Duke Purdue Rutgers Georgetown "
         "Vanderbilt Michigan Auburn").split(),
        ["{p} studied at {v}.", "{p} graduated from {v}.", "{p} attended {v}.", "The alma mater of {p} is {v}."],
        ["{p} earned a degree at {v}.", "{p} is an alumnus of {v}."]),
    "employer": (
        ("Google Microsoft Apple Amazon Intel IBM Boeing Ford Toyota Samsung Sony Nike Walmart Disney Netflix Oracle "
         "Tesla Nokia").split(),
        ["{p} works for {v}.", "{p} is employed by {v}.", "The employer of {p} is {v}.", "{p} has a job at {v}."],
        ["{p} earns a salary from {v}.", "{p} is on the staff of {v}."]),
    "field": (
        ("physics chemistry biology history law medicine economics music philosophy mathematics astronomy psychology "
         "sociology architecture engineering nursing").split(),
        ["{p} works in the field of {v}.", "{p} specializes in {v}.", "The field of {p} is {v}.",
         "{p} is an expert in {v}."],
        ["{p} does research in {v}.", "{p} is known for work in {v}."]),
}
MIN_PEOPLE = 8  # from 8 on, the grid in draw_people gives every first and every last name to two people or more
MAX_PEOPLE = len(FIRST_NAMES) * len(LAST_NAMES)
FFN_ARGS = {"swiglu": {"ffn": "swiglu"}, "moe": {"ffn": "moe"}, "stem": {"ffn": "stem"},
            "stem_all": {"ffn": "stem", "stem_layers": "all"}}  # "all": every layer, filled in per n_layer
# train.py settings; train_args come after them, so they win. n_embd 64 (train.py's default): on a CPU the
# 50304-way lm_head is most of a step's cost whatever the FFN, and it grows with the width. learning_rate 1e-2
# (train.py's default): at 3e-3 only STEM left chance within 300 steps at 16 people (see docs/knowledge.md).
EXPERIMENT_TRAIN_ARGS = {
    "n_layer": 4, "n_head": 4, "n_embd": 64, "block_size": 32, "batch_size": 16, "learning_rate": 1e-2,
    "min_lr": 1e-3, "warmup_iters": 20, "eval_iters": 2, "log_interval": 50,
}


def check_tokens(enc, words, what):
    """Each word must be one token after a space, and no two the same token: the first token is the answer."""
    ids = [enc.encode_ordinary(" " + w) for w in words]
    bad = [w for w, t in zip(words, ids) if len(t) != 1]
    if bad or len({t[0] for t in ids if len(t) == 1}) != len(words):
        raise RuntimeError(f"{what}: {bad or 'two words'} are not one distinct GPT-2 token each after a space")
    return [t[0] for t in ids]


def check_sizes(n, k):
    """One line for an N or K this experiment cannot draw."""
    if not 1 <= k <= len(ATTRIBUTES):
        raise ConfigError(f"n_attributes must be between 1 and {len(ATTRIBUTES)} ({', '.join(ATTRIBUTES)}), got {k}")
    if n < MIN_PEOPLE:
        raise ConfigError(f"n_people must be at least {MIN_PEOPLE}, so that every name is shared by two people, "
                          f"got {n}")
    if n > MAX_PEOPLE:
        raise ConfigError(f"n_people {n} is more than the name lists can name ({len(FIRST_NAMES)} first x "
                          f"{len(LAST_NAMES)} last names = {MAX_PEOPLE}): ask for fewer people or add names")


def draw_people(n, seed, first_names=FIRST_NAMES, last_names=LAST_NAMES):
    """n distinct "First Last" names from a g x g grid of g = ceil(sqrt(n)) first and g last names drawn from
    the lists: person i is (first[i % g], last[(i // g + i) % g]), a Latin square walked row by row, so each
    name is used by n // g people or more (>= 2 from n = 8 on), and no single name token identifies a person."""
    g = math.isqrt(n - 1) + 1
    if g > min(len(first_names), len(last_names)):
        raise ConfigError(f"n_people {n} needs {g} first and {g} last names, but the lists hold "
                          f"{len(first_names)} and {len(last_names)}: ask for fewer people or add names")
    rng = random.Random(seed)
    first, last = rng.sample(first_names, g), rng.sample(last_names, g)
    people = [f"{first[i % g]} {last[(i // g + i) % g]}" for i in range(n)]
    rng.shuffle(people)
    return people


def draw_facts(n, k, seed):
    """(people, facts): facts[i][a] is person i's value of attribute a (the first k), drawn uniformly."""
    check_sizes(n, k)
    people = draw_people(n, seed)
    rng = random.Random(seed + 1)
    values = [ATTRIBUTES[a][0] for a in list(ATTRIBUTES)[:k]]
    return people, [[rng.choice(v) for v in values] for _ in people]


def write_corpus(text_dir, people, facts, passes, seed, n_files=10):
    """`passes` shuffled passes over every (fact, training template) sentence, one sentence a line, spread over
    n_files files; prepare.py holds out every 10th file as val (the same facts, in other orders)."""
    attrs = list(ATTRIBUTES)
    sentences = [t.format(p=p, v=v) for p, row in zip(people, facts) for a, v in zip(attrs, row)
                 for t in ATTRIBUTES[a][1]]
    rng = random.Random(seed)
    if os.path.isdir(text_dir):
        shutil.rmtree(text_dir)  # a corpus for other settings would otherwise leave files behind
    os.makedirs(text_dir)
    for f in range(n_files):
        lines = []
        for _ in range(math.ceil(passes / n_files)):
            rng.shuffle(sentences)
            lines.extend(sentences)
        with open(os.path.join(text_dir, f"facts_{f:02d}.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return len(sentences)


def make_prompts(enc, people, facts):
    """Every (person, attribute, template) as a prompt: the text before " {v}" after a newline, as sentences
    follow one another in the corpus. Returns a dict of numpy arrays and the prompts' token lists."""
    attrs = list(ATTRIBUTES)[:len(facts[0])]
    value_ids = {a: check_tokens(enc, ATTRIBUTES[a][0], a) for a in attrs}
    ids, rows = [], []
    for i, (p, row) in enumerate(zip(people, facts)):
        for a, (attr, v) in enumerate(zip(attrs, row)):
            train_templates, held_templates = ATTRIBUTES[attr][1:]
            for j, t in enumerate(train_templates + held_templates):
                prompt = enc.encode_ordinary("\n" + t[:t.index(" {v}")].format(p=p))
                answer = value_ids[attr][ATTRIBUTES[attr][0].index(v)]
                # the training sentence must tokenize as the prompt, then the answer: what is asked was seen
                assert enc.encode_ordinary("\n" + t.format(p=p, v=v))[:len(prompt) + 1] == prompt + [answer], t
                ids.append(prompt)
                rows.append((i, a, j, j >= len(train_templates), answer))
    person, attr, template, held, answer = (np.array(c) for c in zip(*rows))
    return {"person": person, "attribute": attr, "template": template, "held_out": held, "answer": answer}, ids


@torch.no_grad()
def next_token_logits(model, ids, batch=512):
    """[len(ids), vocab] logits of the token after each prompt; prompts of one length go through together."""
    out = torch.empty(len(ids), model.config.vocab_size)
    by_length = {}
    for i, p in enumerate(ids):
        by_length.setdefault(len(p), []).append(i)
    for rows in by_length.values():
        for s in range(0, len(rows), batch):
            chunk = rows[s:s + batch]
            out[chunk] = model(torch.tensor([ids[i] for i in chunk]), last_only=True)[0][:, -1].float()
    return out


def score(logits, prompts, k, enc):
    """Per prompt: open (the argmax over the vocabulary is the answer) and choice (the argmax among the
    attribute's values is the answer), as boolean arrays."""
    open_ok = logits.argmax(dim=-1).numpy() == prompts["answer"]
    choice_ok = np.zeros_like(open_ok)
    for a, attr in enumerate(list(ATTRIBUTES)[:k]):
        mine = prompts["attribute"] == a
        candidates = torch.tensor(check_tokens(enc, ATTRIBUTES[attr][0], attr))
        picked = candidates[logits[torch.from_numpy(mine)][:, candidates].argmax(dim=-1)].numpy()
        choice_ok[mine] = picked == prompts["answer"][mine]
    return open_ok, choice_ok


def list_bits(k):
    """log2 of each attribute's list size: the bits one correct answer stands for."""
    return np.array([math.log2(len(ATTRIBUTES[a][0])) for a in list(ATTRIBUTES)[:k]])


def summarize(prompts, open_ok, choice_ok, k):
    """Recall on training and held-out templates, and the bits the training-template answers stand for:
    a fact counts as stored in the share of its 4 training templates answered right."""
    held = prompts["held_out"]
    trained = ~held
    per_fact_bits = open_ok[trained] * list_bits(k)[prompts["attribute"][trained]]
    n_train_templates = len(ATTRIBUTES[list(ATTRIBUTES)[0]][1])
    bits = float(per_fact_bits.sum() / n_train_templates)
    return {"recall": float(open_ok[trained].mean()), "recall_held_out": float(open_ok[held].mean()),
            "choice": float(choice_ok[trained].mean()), "choice_held_out": float(choice_ok[held].mean()),
            "bits": bits, "per_attribute": [float(open_ok[trained & (prompts["attribute"] == a)].mean())
                                            for a in range(k)]}


def most_frequent_guess(prompts, facts, k):
    """What always answering each attribute's most frequent value scores, as summarize() reports it."""
    attrs = list(ATTRIBUTES)[:k]
    guess = []
    for a, attr in enumerate(attrs):
        values = [row[a] for row in facts]
        guess.append(max(sorted(set(values)), key=values.count))
    enc = load_tokenizer()
    guess_ids = np.array([check_tokens(enc, [g], attrs[a])[0] for a, g in enumerate(guess)])
    ok = guess_ids[prompts["attribute"]] == prompts["answer"]
    return summarize(prompts, ok, ok, k)


# ----------------------------------------------------------------------------------------------------------
# the experiment: corpora, train.py runs, scores

def parse_list(key, text):
    """A comma separated list of positive ints, or a one-line ConfigError."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{key} must be positive integers separated by commas, e.g. --{key}=100,200, got {text!r}")
    return values


OURS = ("seed", "out_dir", "dataset", "data_dir", "ffn", "stem_layers", "max_iters", "lr_decay_iters", "init_from")


def extra_train_args(text):
    """train_args as a list, refusing the settings the experiment makes itself."""
    extra = shlex.split(text)
    for a in extra:
        key = a[2:].partition("=")[0] if a.startswith("--") else None
        if key in OURS:
            raise ConfigError(f"train_args sets --{key}, which knowledge_experiment.py sets itself: use --seeds, "
                              f"--out_dir, --data_dir, --ffns and --steps instead")
    return extra


def write_data(opts, n, people, facts):
    """Write the corpus for n people and tokenize it with prepare.py; returns (dataset name, sentences a pass)."""
    dataset = f"{opts.name}_n{n}_k{opts.n_attributes}"
    n_sentences = write_corpus(os.path.join(opts.data_dir, dataset + "_text"), people, facts, opts.passes,
                               opts.data_seed)
    meta = prepare(input_path=os.path.join(opts.data_dir, dataset + "_text"), name=dataset, out_root=opts.data_dir,
                   progress=False)
    return dataset, n_sentences, (meta["n_train_tokens"] + meta["n_val_tokens"]) / opts.passes


def model_facts(model, seq_len):
    """What a user compares FFNs by (model.py's accounting)."""
    return {"params": model.num_params(), "active_params": model.active_params_per_token(),
            "flops_per_token": model.flops_per_token(seq_len), "d_ff": model.config.d_ff,
            "stem_layers": model.config.stem_layers}


def score_model(model, enc, prompts, ids, k):
    logits = next_token_logits(model, ids)
    return summarize(prompts, *score(logits, prompts, k, enc), k)


def train_and_score(opts, enc, run, args, extra, stages, prompts, ids):
    """Train run's model through train.py in stages (one lr schedule over the last stage), scoring the checkpoint
    after each; then the untrained model (train.py's initial weights for that seed) on the first seed."""
    run["stages"], run["train_s"] = [], 0.0
    for i, s in enumerate(stages):
        resume = {"init_from": "resume"} if i else {}
        run["train_s"] += run_train(dict(args, max_iters=s, **resume), extra)
        model, ckpt = checkpoint.load_model(args["out_dir"])  # finds what train.py wrote there
        stage = score_model(model, enc, prompts, ids, opts.n_attributes)
        stage.update(steps=s, val_loss=ckpt["best_val_loss"])
        run["stages"].append(stage)
        print(f"{run['label']}, step {s}: recall {stage['recall']:.3f} (held-out templates "
              f"{stage['recall_held_out']:.3f}), choice {stage['choice']:.3f}, {stage['bits']:.0f} bits", flush=True)
    run.update(model_facts(model, ckpt["config"]["block_size"]), model_args=ckpt["model_args"],
               tokens=s * ckpt["config"]["batch_size"] * ckpt["config"]["block_size"]
               * ckpt["config"]["gradient_accumulation_steps"], **run["stages"][-1])
    if run["seed"] == parse_seeds(opts.seeds)[0]:
        torch.manual_seed(run["seed"])  # as train.py's build_model: the weights its first step starts from
        run["untrained"] = score_model(GPT(GPTConfig(**ckpt["model_args"])).eval(), enc, prompts, ids,
                                       opts.n_attributes)
    if not opts.keep_checkpoints:
        path = checkpoint.find(args["out_dir"])
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def experiment(opts):
    t_start, load_start, cpu_start = time.time(), read_loadavg(), cpu_seconds()
    enc = load_tokenizer()
    ns, ffns, seeds, steps = (parse_list("n_people", opts.n_people), opts.ffns.split(","), parse_seeds(opts.seeds),
                              sorted(set(parse_list("steps", opts.steps))))
    curve_n = opts.curve_n or min(ns)
    extra = extra_train_args(opts.train_args)
    os.makedirs(os.path.dirname(opts.json) or ".", exist_ok=True)
    if opts.threads:
        # One thread: on this shared 2-core machine a 2-thread step took 1.5-3.1 s, a 1-thread one 0.31-0.37 s
        # (load 4-5), as threads that wait for each other spin while the other is descheduled.
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)  # the children read it as torch starts
        torch.set_num_threads(opts.threads)
    n_layer = int(next((a.partition("=")[2] for a in extra if a.startswith("--n_layer=")),
                       EXPERIMENT_TRAIN_ARGS["n_layer"]))
    results = {"settings": vars(opts), "train_args": EXPERIMENT_TRAIN_ARGS, "curve_n": curve_n, "steps": steps,
               "attributes": list(ATTRIBUTES)[:opts.n_attributes], "bits_per_fact": list_bits(opts.n_attributes)
               .tolist(), "data": [], "runs": []}
    for n in ns:
        people, facts = draw_facts(n, opts.n_attributes, opts.data_seed)
        dataset, n_sentences, pass_tokens = write_data(opts, n, people, facts)
        prompts, ids = make_prompts(enc, people, facts)
        results["data"].append({"n_people": n, "facts": n * opts.n_attributes, "sentences_per_pass": n_sentences,
                                "tokens_per_pass": pass_tokens, "prompts": len(ids),
                                "most_frequent": most_frequent_guess(prompts, facts, opts.n_attributes)})
        for ffn in ffns:
            for seed in seeds:
                run = {"n_people": n, "ffn": ffn, "seed": seed, "label": f"n{n}_{ffn}_s{seed}"}
                args = dict(EXPERIMENT_TRAIN_ARGS, out_dir=os.path.join(opts.out_dir, run["label"]),
                            data_dir=opts.data_dir, dataset=dataset, seed=seed, lr_decay_iters=steps[-1],
                            eval_interval=steps[-1], **FFN_ARGS[ffn])
                if args.get("stem_layers") == "all":
                    args["stem_layers"] = str(list(range(n_layer))).replace(" ", "")
                train_and_score(opts, enc, run, args, extra, steps if n == curve_n else steps[-1:], prompts, ids)
                # a fact is seen once per training template per pass
                run["sightings"] = run["tokens"] / pass_tokens * len(ATTRIBUTES["birth year"][1])
                results["runs"].append(run)
                write_json(opts.json, results)  # as it goes: an interrupted experiment keeps what it measured
    results.update(wall_s=time.time() - t_start, cpu_s=cpu_seconds() - cpu_start, loadavg_start=load_start,
                   loadavg_end=read_loadavg())
    print("\n" + report(results))
    write_json(opts.json, results)
    if opts.figure:
        draw_figure(results, opts.figure)


def cpu_seconds():
    """CPU time (user + system) of this process and its finished children: the cost on a machine others share,
    where wall time depends on their load."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:  # not Linux
        return None


# ----------------------------------------------------------------------------------------------------------
# the report: tables and the figure, from the results alone (so --what=figure redraws from the JSON)

def mean_of(runs, key):
    return float(np.mean([r[key] for r in runs]))


def report(results):
    runs, data = results["runs"], {d["n_people"]: d for d in results["data"]}
    ffns, seeds = list(dict.fromkeys(r["ffn"] for r in runs)), list(dict.fromkeys(r["seed"] for r in runs))
    pick = lambda n, ffn: [r for r in runs if r["n_people"] == n and r["ffn"] == ffn]  # noqa: E731
    first = {ffn: next(r for r in runs if r["ffn"] == ffn) for ffn in ffns}
    lines = ["| FFN | d_ff | STEM layers | parameters | active per token | training FLOPs per token |",
             "|---|---|---|---|---|---|"]
    for ffn, r in first.items():
        lines.append(f"| {ffn} | {r['d_ff']} | {r['stem_layers'] or '-'} | {r['params'] / 1e6:.2f}M | "
                     f"{r['active_params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M |")
    lines += ["", f"recall of the facts on training templates (open answer, argmax over the vocabulary), seed "
              f"{' / '.join(map(str, seeds))}; chance: the most frequent value, and each model untrained (best)"]
    lines += ["| N | facts | sightings | " + " | ".join(ffns) + " | most frequent | untrained |",
              "|" + "---|" * (len(ffns) + 5)]
    for n, d in data.items():
        cells = [" / ".join(f"{r['recall']:.3f}" for r in pick(n, ffn)) for ffn in ffns]
        untrained = max(r["untrained"]["recall"] for r in runs if r["n_people"] == n and "untrained" in r)
        sightings = next(r["sightings"] for r in runs if r["n_people"] == n)
        lines.append(f"| {n} | {d['facts']} | {sightings:.0f} | " + " | ".join(cells) +
                     f" | {d['most_frequent']['recall']:.3f} | {untrained:.3f} |")
    lines += ["", "mean over seeds: recall on training / held-out templates, choice among the values (training), "
              "bits stored (correct answers x log2 of the list's size), per active and per total parameter",
              "| N | FFN | recall | held-out | choice | bits | bits / active param | bits / param | val loss |",
              "|" + "---|" * 9]
    for n in data:
        for ffn in ffns:
            rs = pick(n, ffn)
            lines.append(f"| {n} | {ffn} | {mean_of(rs, 'recall'):.3f} | {mean_of(rs, 'recall_held_out'):.3f} | "
                         f"{mean_of(rs, 'choice'):.3f} | {mean_of(rs, 'bits'):.0f} | "
                         f"{mean_of(rs, 'bits') / rs[0]['active_params']:.2e} | "
                         f"{mean_of(rs, 'bits') / rs[0]['params']:.2e} | {mean_of(rs, 'val_loss'):.3f} |")
        untrained = max((r["untrained"] for r in runs if r["n_people"] == n and "untrained" in r),
                        key=lambda u: u["choice"])
        for label, c in (("most frequent value", data[n]["most_frequent"]), ("untrained (best FFN)", untrained)):
            lines.append(f"| {n} | {label} | {c['recall']:.3f} | {c['recall_held_out']:.3f} | {c['choice']:.3f} | "
                         f"{c['bits']:.0f} | | | |")
    curve = [r for r in runs if r["n_people"] == results["curve_n"]]
    lines += ["", f"recall against steps at N = {results['curve_n']} (training templates, mean over seeds)",
              "| steps | " + " | ".join(ffns) + " |", "|" + "---|" * (len(ffns) + 1)]
    for i, s in enumerate(results["steps"]):
        cells = [f"{np.mean([r['stages'][i]['recall'] for r in curve if r['ffn'] == ffn]):.3f}" for ffn in ffns]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if "wall_s" in results:
        cpu = f", CPU time {results['cpu_s'] / 60:.1f} min" if "cpu_s" in results else ""
        lines += ["", f"wall time {results['wall_s'] / 60:.1f} min{cpu}; load average (1, 5, 15 min) at start "
                  f"{results['loadavg_start']}, at end {results['loadavg_end']}"]
    return "\n".join(lines)


COLORS = {"swiglu": "tab:blue", "moe": "tab:green", "stem": "tab:red", "stem_all": "tab:orange"}


def draw_figure(results, path):
    """Recall against N (left) and against steps at curve_n (right), one line per FFN (mean over seeds, each
    seed a dot), with the most-frequent-value guess as the floor."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib), the tables above are the results")
        return
    runs = results["runs"]
    ffns = list(dict.fromkeys(r["ffn"] for r in runs))
    ns = [d["n_people"] for d in results["data"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ffn in ffns:
        mine = [r for r in runs if r["ffn"] == ffn]
        left.scatter([r["n_people"] for r in mine], [r["recall"] for r in mine], color=COLORS.get(ffn), s=12,
                     alpha=0.5)
        left.plot(ns, [mean_of([r for r in mine if r["n_people"] == n], "recall") for n in ns], "o-",
                  color=COLORS.get(ffn), label=ffn)
        curve = [r for r in mine if r["n_people"] == results["curve_n"]]
        right.scatter([s for r in curve for s in results["steps"]], [x["recall"] for r in curve for x in r["stages"]],
                      color=COLORS.get(ffn), s=12, alpha=0.5)
        right.plot(results["steps"], [np.mean([r["stages"][i]["recall"] for r in curve])
                                      for i in range(len(results["steps"]))], "o-", color=COLORS.get(ffn), label=ffn)
    left.plot(ns, [d["most_frequent"]["recall"] for d in results["data"]], "k--", label="most frequent value")
    guess = next(d for d in results["data"] if d["n_people"] == results["curve_n"])["most_frequent"]["recall"]
    right.axhline(guess, color="k", linestyle="--", label="most frequent value")
    tokens = {r["n_people"]: r for r in runs}[ns[0]]["tokens"]
    left.set(xscale="log", xlabel="people N (x %d facts each)" % len(results["attributes"]),
             ylabel="recall (training templates)", title=f"recall against N, {results['steps'][-1]} steps "
                                                         f"({tokens / 1e6:.2f}M tokens)")
    right.set(xlabel="training steps", ylabel="recall (training templates)",
              title=f"recall against steps, N = {results['curve_n']} people")
    fig.text(0.5, 0.01, f"{len({r['seed'] for r in runs})} seeds: lines their mean, dots each seed", ha="center",
             fontsize=9)
    left.minorticks_off()  # the N themselves as ticks, not log-scale minor labels that collide with them
    left.set_xticks(ns, [str(n) for n in ns])
    right.set_xlim(0, results["steps"][-1] * 1.05)
    for ax in (left, right):
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the note below
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------

def settings(argv=None):
    """The settings above, then config files and --key=value from argv (sys.argv by default); checked."""
    s, _ = parse(sys.argv[1:] if argv is None else argv, SETTINGS, prog=__file__, doc=__doc__,
                 choices={"what": ("experiment", "figure")})
    for n in parse_list("n_people", s["n_people"]):
        check_sizes(n, s["n_attributes"])
    unknown = [f for f in s["ffns"].split(",") if f not in FFN_ARGS]
    if unknown:
        raise ConfigError(f"ffns: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(FFN_ARGS)}")
    parse_seeds(s["seeds"])
    parse_list("steps", s["steps"])
    if s["curve_n"] and s["curve_n"] not in parse_list("n_people", s["n_people"]):
        raise ConfigError(f"curve_n {s['curve_n']} is not one of n_people ({s['n_people']}); 0 takes the smallest")
    for key, low in (("passes", 1), ("threads", 0), ("data_seed", 0)):
        if s[key] < low:
            raise ConfigError(f"{key} must be at least {low}, got {s[key]}")
    extra_train_args(s["train_args"])
    return SimpleNamespace(**s)


def redraw(opts):
    """The tables and the figure again, from the JSON an experiment wrote."""
    if not os.path.exists(opts.json):
        raise ConfigError(f"no results at {opts.json}: run the experiment first, or point --json at its file")
    with open(opts.json) as f:
        results = jsonlib.load(f)
    print(report(results))
    draw_figure(results, opts.figure or "out/knowledge/knowledge.png")


def main(argv=None):
    opts = settings(argv)
    (experiment if opts.what == "experiment" else redraw)(opts)


if __name__ == "__main__":
    run_main(main, "knowledge_experiment.py")
