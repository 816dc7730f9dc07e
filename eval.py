"""
Score a checkpoint (out_dir/ckpt/ from train.py: STEM, SwiGLU, MoE) the way the STEM paper states its claims;
write out_dir/eval.json and print a table. Settings work as in train.py (configurator.py): --key=value, --help.

    python eval.py --out_dir=out                                   # bpb, loss by position, passkey
    python eval.py --out_dir=out --mc=arc_easy.parquet,obqa.jsonl --limit=500 --parts=bpb

bpb       bits per UTF-8 byte of the val split: the cross-entropy in bits over the bytes the scored tokens decode
          to, comparable across tokenizers and vocab sizes (nanochat); <|endoftext|> and padding are not scored.
position  the same windows: mean loss by position, and the distinct tokens so far (the STEM rows a sequence reads).
passkey   a number hidden at a depth of val-split filler, asked for at the end; greedy, with the KV cache.
mc        task files (.jsonl or .parquet Hugging Face exports of HellaSwag, ARC, OpenBookQA, PIQA, told apart by
          their fields), scored as lm-evaluation-harness scores them: acc, acc_norm.
"""

import json
import math
import os
import re
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch: huge pages for the [B, T, vocab] logits (CPU)
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import configurator
import prepare
from configurator import ConfigError

# ----------------------------------------------------------------------------------------------------------
out_dir = "out"  # reads out_dir/ckpt/ (checkpoint.py), writes out_dir/eval.json
data_dir = ""  # the val split and meta.json (which names the tokenizer) are in data_dir/dataset; "": the checkpoint's
dataset = ""  # "": the checkpoint's
parts = "bpb,position,passkey"  # which of these to run (comma separated); the mc part runs when --mc names files
max_tokens = 65536  # bpb and position: score the first this many val tokens (a fixed share, as nanochat); 0: all
batch_size = 8  # sequences per forward pass
mc = ""  # multiple-choice task files, comma separated; each is keyed in eval.json by its name without extension
limit = 0  # mc: score the first this many items of each file; 0: all
position_bucket = 0  # position: bucket width in tokens; 0: block_size / 8
passkey_lengths = ""  # passkey: lengths in tokens, comma separated; "": 64, 128, 256, ... up to block_size
passkey_depths = "0,0.25,0.5,0.75,1"  # passkey: share of the filler that comes before the number
passkey_trials = 10  # passkey: prompts per (length, depth), each with its own number and filler
passkey_digits = 5  # passkey: digits of the number
seed = 1337  # passkey: the numbers and where the filler is taken from
device = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu", "cuda", "cuda:1", ...
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float16"
stem_offload = False  # leave the STEM table in host memory and fetch the rows each batch reads (stem_offload.py)
# ----------------------------------------------------------------------------------------------------------
SETTINGS = configurator.defaults_of(globals())  # before the constants below, which are not settings
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
# a task file's format, told by the fields of its items (the Hugging Face exports of each task)
FORMATS = {"hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
           "arc": ("question", "choices", "answerKey"), "openbookqa": ("question_stem", "choices", "answerKey"),
           "piqa": ("goal", "sol1", "sol2", "label")}


def validate(cfg):
    configurator.check_device(cfg.device)
    for key, kind in dict(parts=str, mc=str, passkey_depths=float, passkey_lengths=int).items():  # comma separated
        try:
            setattr(cfg, key, [kind(v.strip()) for v in getattr(cfg, key).split(",") if v.strip()])
        except ValueError:
            raise ConfigError(f"{key} must be comma separated {kind.__name__}s, got {getattr(cfg, key)!r}") from None
    if set(cfg.parts) - {"bpb", "position", "passkey"} or not (cfg.parts or cfg.mc):
        raise ConfigError(f"parts must name some of bpb, position, passkey (or give --mc files), got {cfg.parts}")
    lows = dict(batch_size=1, passkey_trials=1, passkey_digits=1, max_tokens=0, limit=0, position_bucket=0)
    for key, low in lows.items():
        if getattr(cfg, key) < low:
            raise ConfigError(f"{key} must be at least {low}, got {getattr(cfg, key)}")
    if not cfg.passkey_depths or not 0 <= min(cfg.passkey_depths) <= max(cfg.passkey_depths) <= 1:
        raise ConfigError(f"passkey_depths are shares of the filler, between 0 and 1, got {cfg.passkey_depths}")
    names = [os.path.splitext(os.path.basename(p))[0] for p in cfg.mc]
    if len(set(names)) < len(names):
        raise ConfigError(f"--mc: results are keyed by file name and two files are named alike ({names}): "
                          f"copy them to distinct names, e.g. arc_easy.parquet and arc_challenge.parquet")


def token_bytes(enc, vocab_size):
    """UTF-8 bytes each id decodes to; 0 for special tokens, the vocabulary's padding ids and the gaps in a
    ranks-file tokenizer's numbering (not text)."""
    out = np.zeros(vocab_size, dtype=np.int64)
    for t in range(min(enc.n_vocab, vocab_size)):
        try:
            out[t] = len(enc.decode_single_token_bytes(t))
        except KeyError:
            pass
    out[[t for t in (enc.encode_single_token(s) for s in enc.special_tokens_set) if t < vocab_size]] = 0
    return out


def nats(cfg, model, rows_fn, x, y):
    """The cross-entropy of each target y [B, T] given x [B, T] (host tensors), in nats; 0 where y is -1."""
    x, y = x.to(cfg.device), y.to(cfg.device)
    with torch.no_grad(), cfg.autocast:
        logits = model(x, stem_rows=rows_fn(x, 0) if rows_fn else None)[0]
    flat = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return flat.view(y.shape).cpu()  # (flat: over the vocab's contiguous dim, 3x faster than a transposed view)


def val_pass(cfg, model, rows_fn, data, nbytes):
    """bpb and position from one pass over the val split in back-to-back windows: every target scored once."""
    bs = model.config.block_size
    n = len(data) - 1 if cfg.max_tokens == 0 else min(cfg.max_tokens, len(data) - 1)  # targets data[1..n]
    starts, total_bytes = list(range(0, n, bs)), 0
    pos_nats, pos_count, seen, windows = (np.zeros(bs) for _ in range(4))  # sums by position in the window
    for i in tqdm(range(0, len(starts), cfg.batch_size), desc="bpb", unit="batch", leave=False):
        x = torch.zeros(len(starts[i:i + cfg.batch_size]), bs, dtype=torch.long)
        y = torch.full_like(x, -1)  # the last window may be short: the rest of its row is not scored
        for r, s in enumerate(starts[i:i + cfg.batch_size]):
            w = data[s:min(s + bs, n) + 1].astype(np.int64)
            x[r, :len(w) - 1], y[r, :len(w) - 1] = torch.from_numpy(w[:-1]), torch.from_numpy(w[1:])
            first = np.zeros(len(w) - 1)
            first[np.unique(w[:-1], return_index=True)[1]] = 1  # where each token first appears
            seen[:len(w) - 1] += np.cumsum(first)
            windows[:len(w) - 1] += 1
        b = np.where(y.numpy() >= 0, nbytes[y.clamp(min=0).numpy()], 0)
        y[torch.from_numpy(b == 0)] = -1  # text only
        pos_nats += nats(cfg, model, rows_fn, x, y).double().sum(0).numpy()
        pos_count, total_bytes = pos_count + (b > 0).sum(0), total_bytes + b.sum()
    if total_bytes == 0:
        raise ConfigError("the val tokens scored decode to no text: raise max_tokens, or check the data")
    width, tokens = cfg.position_bucket or max(1, bs // 8), pos_count.sum()
    row = model.stem_table.size(1) if model.stem_table is not None else 0  # parameters in one token's rows
    position = [dict(start=a, end=e, loss=float(pos_nats[a:e + 1].sum() / max(1, pos_count[a:e + 1].sum())),
                     distinct_tokens=float(seen[e] / windows[e]), stem_params=int(round(seen[e] / windows[e] * row)))
                for a in range(0, bs, width) for e in [min(a + width, bs) - 1] if windows[e]]
    return dict(bpb=float(pos_nats.sum() / math.log(2) / total_bytes), val_tokens=int(tokens),
                val_bytes=int(total_bytes), val_loss=float(pos_nats.sum() / tokens)), position


# ----------------------------------------------------------------------------------------------------------
# multiple choice, as lm-evaluation-harness 0.4: "context" + " " + choice, the choice's summed log-probabilities

def read_items(path):
    try:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq  # here: only parquet files need it
            return pq.read_table(path).to_pylist()
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    raise ConfigError(f"{path}: task files must be .jsonl or .parquet (a Hugging Face export of the task)")


def task_format(path, item):
    for name, fields in FORMATS.items():
        if isinstance(item, dict) and all(f in item for f in fields):
            if name != "arc" or isinstance(item["question"], str):  # the raw ARC files nest it: not the export
                return name
    got = f"the fields {', '.join(sorted(item))}" if isinstance(item, dict) else f"a {type(item).__name__}"
    raise ConfigError(f"{path} is in no known format (its items have {got}); expected the fields of " +
                      "; ".join(f"{n}: {', '.join(fs)}" for n, fs in FORMATS.items()) + " (ARC's question is text)")


def hellaswag_text(text):  # lm-evaluation-harness's HellaSwag preprocessing (the brackets are WikiHow artifacts)
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def request(fmt, item):
    """(context, choices, gold index or None) of one item."""
    if fmt == "hellaswag":
        ctx = hellaswag_text(f"{item['activity_label']}: {item['ctx_a']} {item['ctx_b'].capitalize()}")
        label = item["label"]
        return ctx, [hellaswag_text(e) for e in item["endings"]], int(label) if str(label).strip().isdigit() else None
    if fmt == "piqa":
        return f"Question: {item['goal']}\nAnswer:", [item["sol1"], item["sol2"]], item["label"]
    labels, key = item["choices"]["label"], str(item["answerKey"]).lstrip()
    ctx = item["question_stem"] if fmt == "openbookqa" else f"Question: {item['question']}\nAnswer:"
    return ctx, item["choices"]["text"], labels.index(key) if key in labels else None


def choice_scores(cfg, model, rows_fn, enc, pairs, desc):
    """Sum of the log-probabilities of each choice's tokens after its context, for [(context, choice)]. Tokens as
    lm-eval's TemplateLM._encode_pair and loglikelihood (lm_eval/api/model.py): the context's trailing whitespace
    moves in front of " " + choice and is scored with it (acc_norm still divides by len(choice)); context + choice
    is encoded whole and split after the context's own tokens; an empty context is the end of text (meta.json's
    eot_token). Contexts are cut from the left to fit block_size, never the choice."""
    bs, seqs = model.config.block_size, []
    for ctx, choice in pairs:
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + " " + choice
        c = enc.encode_ordinary(ctx)
        cont = enc.encode_ordinary(ctx + cont)[len(c):]
        if len(cont) > bs:
            raise ConfigError(f"{desc}: a choice of {len(cont)} tokens does not fit block_size {bs}")
        seqs.append((((c or [enc.eot_token]) + cont)[-(bs + 1):], len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))  # like lengths together: less padding
    scores = [0.0] * len(seqs)
    for i in tqdm(range(0, len(order), cfg.batch_size), desc=desc, unit="batch"):
        batch = order[i:i + cfg.batch_size]
        x = torch.zeros(len(batch), len(seqs[batch[0]][0]) - 1, dtype=torch.long)
        y = torch.full_like(x, -1)  # only the choice's tokens are scored
        for r, j in enumerate(batch):
            toks, k = seqs[j]
            x[r, :len(toks) - 1] = torch.tensor(toks[:-1])
            y[r, len(toks) - 1 - k:len(toks) - 1] = torch.tensor(toks[-k:])
        for r, total in enumerate(nats(cfg, model, rows_fn, x, y).double().sum(1).tolist()):
            scores[batch[r]] = -total
    return scores


def mean_stderr(xs):  # lm-evaluation-harness's: the sample standard deviation over sqrt(n)
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((v - m) ** 2 for v in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else None


def load_task(cfg, path):
    """(name, format, [(context, choices, gold)]) of a task file; every item is checked before any is scored."""
    items = read_items(path)[:cfg.limit or None]
    if not items:
        raise ConfigError(f"{path} holds no items")
    fmt, reqs = task_format(path, items[0]), []
    for i, item in enumerate(items):
        try:
            ctx, choices, gold = request(task_format(path, item), item)
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: item {i} does not fit the {fmt} format ({type(e).__name__}: {e})") from None
        if type(gold) is not int or gold not in range(len(choices)):
            raise ConfigError(f"{path}: item {i} has no gold answer among its {len(choices)} choices (label or "
                              f"answerKey {item.get('label', item.get('answerKey'))!r}); test splits hide theirs: "
                              f"use the validation split")
        reqs.append((ctx, choices, gold))
    return os.path.splitext(os.path.basename(path))[0], fmt, reqs


def run_task(cfg, model, rows_fn, enc, name, fmt, reqs):
    scores = iter(choice_scores(cfg, model, rows_fn, enc, [(c, ch) for c, chs, _ in reqs for ch in chs], name))
    acc, acc_norm = [], []
    for ctx, choices, gold in reqs:
        s = [next(scores) for _ in choices]
        acc.append(float(max(range(len(s)), key=lambda j: s[j]) == gold))  # the first of equal scores, as argmax
        acc_norm.append(float(max(range(len(s)), key=lambda j: s[j] / max(1, len(choices[j]))) == gold))
    (a, a_se), (an, an_se) = mean_stderr(acc), mean_stderr(acc_norm)
    return dict(format=fmt, n=len(reqs), acc=a, acc_stderr=a_se, acc_norm=an, acc_norm_stderr=an_se,
                      chance=sum(1 / len(c) for _, c, _ in reqs) / len(reqs))


# ----------------------------------------------------------------------------------------------------------
# passkey retrieval

def passkey_prompt(enc, filler, rng, length, depth, digits):
    """(prompt ids, answer ids) for one trial: filler tokens, the needle after `depth` of them, the question;
    the prompt is length - digits tokens, which leaves room for any answer of that many digits."""
    key = str(rng.integers(10 ** (digits - 1), 10 ** digits))
    needle, question = enc.encode_ordinary(NEEDLE.format(key=key)), enc.encode_ordinary(QUESTION)
    n = length - digits - len(needle) - len(question)  # filler tokens
    if n < 0 or n >= len(filler):
        raise ConfigError(f"passkey length {length} leaves {n} tokens of filler (the val split has {len(filler)}): "
                          f"use lengths from {length - n} tokens up, within the val split")
    start = int(rng.integers(0, len(filler) - n))
    text, cut = filler[start:start + n].tolist(), round(depth * n)
    return text[:cut] + needle + text[cut:] + question, enc.encode_ordinary(" " + key)


def passkey(cfg, model, rows_fn, enc, filler):
    bs = model.config.block_size
    lengths = cfg.passkey_lengths or sorted({min(64 << k, bs) for k in range(max(1, bs.bit_length()))})
    if max(lengths) > bs:
        raise ConfigError(f"passkey_lengths {lengths}: the model's context is {bs} tokens; use lengths up to {bs}")
    cells = []
    for length, depth in ((n, d) for n in lengths for d in cfg.passkey_depths):
        rng = np.random.default_rng([cfg.seed, length, round(depth * 1e6)])  # a cell's trials: its own seed
        trials, hits = [passkey_prompt(enc, filler, rng, length, depth, cfg.passkey_digits)
                        for _ in range(cfg.passkey_trials)], 0
        for i in range(0, len(trials), cfg.batch_size):  # one length: the prompts batch without padding
            chunk = trials[i:i + cfg.batch_size]
            x = torch.tensor([p for p, _ in chunk], device=cfg.device)
            with torch.no_grad(), cfg.autocast:
                out = model.generate(x, max(len(a) for _, a in chunk), temperature=0, stem_rows_fn=rows_fn)
            hits += sum(out[r, x.size(1):x.size(1) + len(a)].tolist() == a for r, (_, a) in enumerate(chunk))
        cells.append(dict(length=length, depth=depth, acc=hits / len(trials)))
    return dict(digits=cfg.passkey_digits, trials=cfg.passkey_trials, acc=sum(c["acc"] for c in cells) / len(cells),
                cells=cells)


# ----------------------------------------------------------------------------------------------------------

def table(res):
    m = res["model"]
    lines = [f"{res['checkpoint']}: {m['ffn']}, {m['n_layer']} layers x {m['n_embd']}, step {m['iter_num']}; "
             f"val split of {res['data']}"]
    if "bpb" in res:
        lines.append(f"bpb       {res['bpb']:.4f}   ({res['val_tokens']:,} tokens, {res['val_bytes']:,} bytes, "
                     f"{res['val_bytes'] / res['val_tokens']:.2f} bytes/token, loss {res['val_loss']:.4f} nats/token)")
    if "position" in res:
        lines.append("position  tokens     loss   distinct tokens   STEM params read")
        lines += [f"          {p['start']:>4}-{p['end']:<5} {p['loss']:.3f}  {p['distinct_tokens']:>15.1f}   "
                  f"{p['stem_params']:>16,}" for p in res["position"]]
    for name, t in res.get("mc", {}).items():
        se = lambda v: "" if v is None else f" ± {v:.3f}"
        lines.append(f"mc        {name}: n {t['n']}, acc {t['acc']:.3f}{se(t['acc_stderr'])}, acc_norm "
                     f"{t['acc_norm']:.3f}{se(t['acc_norm_stderr'])} (chance {t['chance']:.3f}; {t['format']})")
    if "passkey" in res:
        pk = res["passkey"]
        depths, lengths = (sorted({c[k] for c in pk["cells"]}) for k in ("depth", "length"))
        acc = {(c["length"], c["depth"]): c["acc"] for c in pk["cells"]}
        lines.append(f"passkey   {pk['digits']} digits, {pk['trials']} trials a cell, accuracy {pk['acc']:.3f}; "
                     f"length \\ depth " + " ".join(f"{d:>5g}" for d in depths))
        lines += [f"{n:>16} " + " ".join(f"{acc[n, d]:5.2f}" for d in depths) for n in lengths]
    return "\n".join(lines)


def main(argv):
    cfg = configurator.configure({**SETTINGS, "__file__": __file__, "__doc__": __doc__}, argv,
                                 choices={"dtype": ("float32", "bfloat16", "float16")})
    validate(cfg)
    tasks = [load_task(cfg, p) for p in cfg.mc]  # a bad task file stops the run here, before any scoring
    path = checkpoint.find(cfg.out_dir)
    model, ckpt, rows_fn = checkpoint.load_for_inference(path, cfg.device, cfg.stem_offload)
    saved = ckpt.get("config", {})
    folder = os.path.join(cfg.data_dir or saved.get("data_dir", "data"), cfg.dataset or saved.get("dataset", ""))
    enc = prepare.dataset_tokenizer(folder)  # the one the checkpoint's data was prepared with, named by meta.json
    if enc is None:
        raise ConfigError(f"cannot find the tokenizer of {path}: no {os.path.join(folder, 'meta.json')} names "
                          f"one; point --data_dir and --dataset at the data it was trained on (prepared by prepare.py)")
    cfg.autocast = torch.autocast(torch.device(cfg.device).type, getattr(torch, cfg.dtype),
                                  enabled=cfg.dtype != "float32")
    res = dict(checkpoint=path, data=folder, model={k: getattr(model.config, k) for k in ("ffn", "n_layer",
               "n_embd", "block_size")} | dict(iter_num=ckpt.get("iter_num"), params=model.num_params()))
    if cfg.parts and not os.path.exists(os.path.join(folder, "val.bin")):
        raise ConfigError(f"no val split at {folder}/val.bin: run prepare.py, or set --data_dir/--dataset")
    data = prepare.read_tokens(folder, "val") if cfg.parts else None
    t0 = time.time()
    if "passkey" in cfg.parts:  # the quick parts first: a setting that does not fit fails in seconds
        res["passkey"] = passkey(cfg, model, rows_fn, enc, data)
    if tasks:
        res["mc"] = {task[0]: run_task(cfg, model, rows_fn, enc, *task) for task in tasks}
    if {"bpb", "position"} & set(cfg.parts):  # one pass gives both
        bpb, position = val_pass(cfg, model, rows_fn, data, token_bytes(enc, model.config.vocab_size))
        res.update(bpb, position=position)
    res["seconds"] = round(time.time() - t0, 1)  # scoring, after loading
    out = os.path.join(cfg.out_dir, "eval.json")
    with open(out + ".tmp", "w") as f:  # temp name, then rename: a kill leaves the old file or the new one
        json.dump(res, f, indent=1)
    os.replace(out + ".tmp", out)
    print(table(res) + f"\nwrote {out}")
    return res


if __name__ == "__main__":
    configurator.run_main(lambda: main(sys.argv[1:]), "eval.py")
