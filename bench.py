"""
Benchmarks for stem-gpt: what STEM costs and saves next to SwiGLU and MoE. One harness; a key picks what runs:

    python bench.py                          # all but quality and gpu: ffn step vocab gather sample capacity offload
    python bench.py --what=step              # one of: ffn step vocab gather sample capacity offload quality gpu
    python bench.py --what=quality           # trains 4 small models through train.py (~15 min on 2 CPU cores)
    python bench.py --what=gpu               # the GPU check, <= 10 min on one H100; writes bench_gpu.json
    python bench.py --json=bench.json        # also write every table and the raw timings as JSON
    python bench.py --tiny=True --threads=1  # toy sizes everywhere: checks the plumbing in a minute or two

Each measurement is a short function that prints a markdown table (and adds it to the JSON). How timings are
taken: `warmup` untimed rounds, then `reps` rounds in which the variants being compared take turns (round-robin,
the first one rotating each round), so that slow phases of a shared machine fall on all variants alike; a
variant's figure is the median of its rounds; on a GPU, torch.cuda.synchronize before and after every timed
call. Absolute times on a shared machine are noisy: read the ratios of variants timed side by side in one run
(step reports the median and the range of the per-round ratio STEM/SwiGLU).

Training steps (step, vocab, gpu) are train.py's own: a run-state from train.configure, train.build_model and
train.build_optimizers, and train.train_step fed by train.micro_batches with bench's batches (Shakespeare
val.bin tokens where prepared, else Zipfian ids). step and vocab run each group of variants in a fresh child
process, so that a dense table's gradient (allocated and freed every step) or an out-of-memory kill cannot
disturb anything else. quality runs train.py itself, once per variant.
--what=gpu without CUDA exits at once with a one-line error (status 1).
"""

import dataclasses
import json as jsonlib
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import configurator
import stem_ops
import stem_sparse
import train
from configurator import ConfigError
from model import GPT, GPTConfig, MoE, STEM, StemRows, SwiGLU

# ----------------------------------------------------------------------------------------------------------
# settings (config/*.py files and --key=value, see configurator.py; python bench.py --help lists them)
what = "all"  # all (all but quality and gpu) or one of: ffn step vocab gather sample capacity offload quality gpu
device = "cuda" if torch.cuda.is_available() else "cpu"  # where ffn..offload run; gpu always uses cuda
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or float32
reps = 0  # timed rounds per measurement; 0: each one's own default (fewer where a call takes seconds)
warmup = 1  # untimed rounds first (gpu: at least 3 training steps, for torch.compile)
threads = 0  # torch CPU threads; 0: torch's default (one per core). On a busy machine 1 is far steadier
seed = 1337
data_dir = "data/shakespeare"  # val.bin from `python prepare.py`; without it, Zipfian token ids stand in
json = ""  # write the results here; gpu's default: $OUT/bench_gpu.json if OUT is set, else bench_gpu.json
tiny = False  # toy shapes everywhere: the smoke test, and a quick check that everything runs
profile = False  # ffn, step: also a torch.profiler table of where each variant's time goes
quality_config = "config/quality_shakespeare.py"  # quality: the shared train.py config; variants differ in ffn
quality_out = "out/quality"  # quality: each variant trains in quality_out/<variant>
quality_extra = ""  # quality: more train.py settings for every variant, e.g. "--max_iters=100" (space separated)
pcie_gb_s = 25.0  # offload projection: host<->GPU copy speed, each direction (PCIe 4.0 x16, effective)
peak_tflops = 989.0  # offload projection: the GPU's dense bf16 peak (H100 SXM)
mfu_assumed = 0.40  # offload projection: the model FLOPs utilisation the step's compute is projected at
# ----------------------------------------------------------------------------------------------------------
DEFAULTS = configurator.defaults_of(globals())
GPT2_VOCAB = 50304
LR = 6e-4  # the learning rate of every timed training step


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def dev():
    return torch.device(device)


def sync():
    if dev().type == "cuda":
        torch.cuda.synchronize(dev())


def autocast():
    return nullcontext() if dtype == "float32" else torch.autocast(dev().type, dtype=getattr(torch, dtype))


def n_reps(cpu_default, gpu_default=20):
    return reps or (2 if tiny else gpu_default if dev().type == "cuda" else cpu_default)


def time_round_robin(fns, rounds, n_warmup=None):
    """Seconds per call of each fn: (medians, every round's times). Round r calls every fn once, starting at
    the r-th, so a slow phase of the machine falls on all of them alike."""
    names = list(fns)
    for _ in range(warmup if n_warmup is None else n_warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, times


def ratio(a, b):
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------------------------------------
# tokens: real text where prepared

_tokens = {}


def has_data():
    return os.path.exists(os.path.join(data_dir, "val.bin"))


def source():
    return "Shakespeare validation text" if has_data() else "Zipfian ids (no data prepared)"


def text_tokens(vocab):
    """The validation split as int64 ids < vocab. A vocab smaller than the data's renumbers ids by frequency
    (the most common is 0) and folds the rare tail modulo vocab, keeping the Zipfian shape. Without prepared
    data: 500k ids drawn from a Zipf law (exponent 1.1)."""
    if vocab not in _tokens:
        path = os.path.join(data_dir, "val.bin")
        if os.path.exists(path):
            data = np.fromfile(path, dtype=np.uint16).astype(np.int64)
        else:
            rng = np.random.default_rng(seed)
            p = 1.0 / np.arange(1, 50258) ** 1.1
            data = rng.permutation(50257)[rng.choice(50257, size=500_000, p=p / p.sum())]
        if data.max() >= vocab:
            counts = np.bincount(data)
            rank = np.empty_like(counts)
            rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
            data = rank[data] % vocab
        _tokens[vocab] = torch.from_numpy(data)
    return _tokens[vocab]


def host_batches(n, B, T, vocab, offset=0):
    """n batches (x, y) of B random windows of T tokens, y = x shifted by one, in host memory."""
    data = text_tokens(vocab)
    starts = torch.randint(len(data) - T - 1, (n, B), generator=torch.Generator().manual_seed(seed + offset))
    return [(torch.stack([data[s:s + T] for s in row]), torch.stack([data[s + 1:s + T + 1] for s in row]))
            for row in starts.tolist()]


# ----------------------------------------------------------------------------------------------------------
# results: a markdown table each, and the same rows in the JSON

def result(name, title, columns, rows, notes=(), raw=None):
    return {"name": name, "title": title, "columns": columns, "rows": rows, "notes": list(notes), "raw": raw}


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, (bool, str)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:.3g}"


def print_result(res):
    print(f"\n### {res['title']}\n\n| " + " | ".join(res["columns"]) + " |\n|" + "---|" * len(res["columns"]))
    for row in res["rows"]:
        print("| " + " | ".join(fmt(v) for v in row) + " |")
    if res["notes"]:
        print("\n" + "\n".join(f"- {note}" for note in res["notes"]))
    sys.stdout.flush()


def machine():
    if dev().type == "cuda":
        return torch.cuda.get_device_name(dev())
    return f"CPU, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def failed(name, title, error):
    return result(name, f"{title}: failed", ["error"], [[error]])


# ----------------------------------------------------------------------------------------------------------
# training steps through train.py's code

def train_cfg(**settings):
    """train.py's run-state for these settings, made as its main() makes it: configure, validate, setup."""
    argv = [f"--{k}={v}" for k, v in {"device": device, "dtype": dtype, "seed": seed, **settings}.items()]
    cfg = train.configure(argv)
    train.validate(cfg)
    train.setup_distributed(cfg)
    return cfg


def trainer(batches, **settings):
    """A model and optimizers as train.py builds them; .step() is one train.train_step -> (loss, grad norm),
    fed by train.micro_batches with `batches` (host (x, y) pairs) in turn."""
    cfg = train_cfg(**settings)
    model = train.build_model(cfg)
    optimizer, rows_opt = train.build_optimizers(cfg, model)
    if rows_opt is not None and cfg.device_type == "cpu" and not cfg.stem_offload:
        lazy_zero_moments(rows_opt, batches)
    compiled = torch.compile(model) if cfg.compile else model

    def draw(step, micro):  # as train.get_batch hands a batch over: (x on the host, x, y on the device)
        x, y = batches[(step * cfg.micro_steps + micro) % len(batches)]
        if cfg.device_type == "cuda":
            return x, x.pin_memory().to(cfg.device, non_blocking=True), y.pin_memory().to(cfg.device, non_blocking=True)
        return x, x, y

    stream = train.micro_batches(cfg, rows_opt, 0, draw=draw)
    return SimpleNamespace(cfg=cfg, model=model, rows_opt=rows_opt, losses=[],
                           step=lambda: train.train_step(cfg, compiled, optimizer, rows_opt, stream, LR))


def lazy_zero_moments(rows_opt, batches):
    """On a CPU, swap the row AdamW's zero-filled moments (2 x the table, every page written) for zeros the kernel
    commits only where written (numpy's come from calloc), then write the rows of the batches to be used, so their
    pages exist as zeros_like's would. Same arithmetic; a GPT-2-small STEM model (table 4.5 GB, moments 9 GB)
    then fits beside SwiGLU and MoE in 23 GB, and no step pays a first-touch page fault."""
    ids = torch.unique(torch.cat([x.flatten() for x, _ in batches]))
    for name in ("exp_avg", "exp_avg_sq"):
        shape = tuple(getattr(rows_opt, name).shape)
        setattr(rows_opt, name, None)  # free the filled one first
        setattr(rows_opt, name, torch.from_numpy(np.zeros(shape, dtype=np.float32)).index_fill_(0, ids, 0.0))


def step_shape(kind):
    """(n_layer, n_embd, d_ff, batch, seq_len). vocab uses a smaller model: a dense 131072-row table at
    GPT-2-small's shape would need ~60 GB."""
    if tiny:
        return 2, 64, 128, 2, 32
    if kind == "vocab":
        return 4, 256, 704, 4, 256
    return (12, 768, 2048, 8, 1024) if dev().type == "cuda" else (12, 768, 2048, 4, 256)


def model_settings(variant, vocab, kind):
    n_layer, n_embd, d_ff, B, T = step_shape(kind)
    return dict(ffn=variant.split("_")[0], stem_optim="dense" if variant == "stem_dense" else "sparse",
                vocab_size=vocab, n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, d_ff=d_ff,
                batch_size=B, block_size=T)


def time_steps(kind, specs):
    """Training steps of each spec ("variant@vocab"; variants stem (sparse table), stem_dense, swiglu, moe),
    round-robin in this process. Per spec: median ms, every round's ms, tokens/s, MFU, accounting, last loss."""
    B, T = step_shape(kind)[3:]
    runs, out = {}, {}
    for spec in specs:
        variant, vocab = spec.split("@")
        log(f"{kind}: building {spec}")
        runs[spec] = trainer(host_batches(4, B, T, int(vocab)), **model_settings(variant, int(vocab), kind))
    log(f"{kind}: timing {', '.join(specs)}")
    medians, times = time_round_robin({s: (lambda r=r: r.losses.append(r.step()[0])) for s, r in runs.items()},
                                      n_reps(3, 10))
    for spec, run in runs.items():
        m, tps = run.model, B * T / medians[spec]
        out[spec] = {"ms": medians[spec] * 1e3, "times_ms": [t * 1e3 for t in times[spec]], "tokens_per_s": tps,
                     "mfu": m.estimate_mfu(tps, dev(), seq_len=T), "params": m.num_params(),
                     "active": m.active_params_per_token(), "flops_per_token": m.flops_per_token(T),
                     "loss": run.losses[-1]}
    if profile:
        out["profile"] = profile_ops({s: r.step for s, r in runs.items()}, f"{kind} profile")
    return out


def _in_child(settings, fn_name, args):
    apply(settings)
    return globals()[fn_name](*args)


def isolated(fn, *args):
    """fn(*args) in a fresh Python process with this run's settings; {"error": ...} if it fails or is killed."""
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_in_child, {k: globals()[k] for k in DEFAULTS}, fn.__name__, args).result()
    except Exception as e:  # BrokenProcessPool when the child was killed (out of memory?), or its own error
        return {"error": f"{type(e).__name__}: {e}".strip()}


def profile_ops(fns, title, calls=3):
    """Self time per aten op (CPU time on a CPU, kernel time on a GPU) of each fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = dev().type == "cuda"
    per_op = {}
    for name, fn in fns.items():
        with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(calls):
                fn()
            sync()
        for e in prof.key_averages():
            t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / calls / 1e3
            if e.key.startswith("aten::") and t > 0:
                per_op.setdefault(e.key, {})[name] = t
    rows = [[op] + [per_op[op].get(n) for n in fns] for op in sorted(per_op, key=lambda k: -max(per_op[k].values()))[:14]]
    rows.append(["all aten ops"] + [sum(per_op[op].get(n, 0) for op in per_op) for n in fns])
    return result(title.replace(" ", "_"), f"{title}: self time per op, ms per call (torch.profiler)",
                  ["op"] + list(fns), rows, [f"{machine()}; mean over {calls} calls after the timed rounds"])


# ----------------------------------------------------------------------------------------------------------
# ffn: one FFN module, forward + backward

def ffn_flop_ratios(d_model, d_ff, vocab):
    """Each FFN's matmul FLOPs over SwiGLU's, from GPT.matmul_params_per_token of one-layer models."""
    counts = {}
    for ffn in ("swiglu", "stem", "moe"):
        with torch.device("meta"):
            m = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=1, n_head=max(1, d_model // 64),
                              n_embd=d_model, d_ff=d_ff, ffn=ffn, stem_layers=[0]))
        counts[ffn] = m.matmul_params_per_token() - m.lm_head.weight.numel() - 4 * d_model * d_model
    return {k: v / counts["swiglu"] for k, v in counts.items()}


def bench_ffn():
    d, f, B, T, vocab = (64, 128, 4, 64, 1024) if tiny else (768, 2048, 8, 256, GPT2_VOCAB)
    cfg = GPTConfig(vocab_size=vocab, n_layer=1, n_head=max(1, d // 64), n_embd=d, d_ff=f, stem_layers=[0])
    moe_cfg = dataclasses.replace(cfg, ffn="moe", stem_layers=None)
    torch.manual_seed(seed)
    with torch.device(dev()):
        swiglu, stem, moe = SwiGLU(d, f), STEM(cfg, 0), MoE(moe_cfg)
        table = torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.empty(vocab, f)))  # one layer's, as GPT's
        x = torch.randn(B, T, d, requires_grad=True)
        grad_y = torch.randn(B, T, d)
    lookup = stem_sparse.SparseRowAdamW(table).lookup  # the sparse trainer's per-batch work: unique, rows leaf
    batches = [xb.to(dev()) for xb, _ in host_batches(8, B, T, vocab)]
    calls = [0]

    def clear(module):
        x.grad = None
        module.zero_grad(set_to_none=True)

    def run_swiglu():
        clear(swiglu)
        with autocast():
            y = swiglu(x)
        y.backward(grad_y)

    def run_moe():
        clear(moe)
        with autocast():
            y, aux = moe(x)
        torch.autograd.backward([y, aux], [grad_y, torch.ones_like(aux)])

    def run_stem(kernel):
        def go():
            clear(stem)
            rows = lookup(batches[calls[0] % len(batches)])
            calls[0] += 1
            with autocast():
                y = stem(x, dataclasses.replace(rows, layers=(rows.rows,), fused=stem_ops.use_triton(kernel, dev())))
            y.backward(grad_y)
        return go

    fns = {"swiglu": run_swiglu, "stem/torch": run_stem("torch")}
    if dev().type == "cuda" and stem_ops.triton is not None:
        fns["stem/triton"] = run_stem("triton")
    fns["moe"] = run_moe
    log(f"ffn: timing {', '.join(fns)} at d_model {d}, d_ff {f}, {B * T} tokens")
    medians, times = time_round_robin(fns, n_reps(10, 50))
    flops = ffn_flop_ratios(d, f, vocab)
    rows = [[name.split("/")[0], (name.split("/") + ["-"])[1], t * 1e3, ratio(t, medians["swiglu"]),
             flops[name.split("/")[0]]] for name, t in medians.items()]
    distinct = statistics.mean(torch.unique(b).numel() for b in batches)
    notes = [f"{machine()}, {dtype}; d_model {d}, d_ff {f}, {B} x {T} = {B * T} tokens; forward + backward "
             f"(gradients for x and every weight); median of {n_reps(10, 50)} interleaved rounds",
             f"STEM is model.STEM fed a StemRows from stem_sparse.SparseRowAdamW.lookup (torch.unique of the ids, the "
             f"compact rows as a leaf requiring grad), as in a training step: {source()}, {distinct:.0f} distinct "
             f"ids of {B * T} on average; one layer's {vocab} x {f} table",
             f"MoE: {moe_cfg.n_expert} experts of d_ff/{moe_cfg.moe_top_k}, top-{moe_cfg.moe_top_k}, a loop over "
             f"experts; its FLOP ratio counts the router"]
    res = result("ffn", "ffn: one FFN layer, forward + backward",
                 ["FFN", "kernel", "ms (median)", "ratio to SwiGLU", "FLOP ratio (model accounting)"], rows, notes,
                 {"times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}, "flop_ratios": flops})
    return [res, profile_ops(fns, "ffn profile")] if profile else res


# ----------------------------------------------------------------------------------------------------------
# step: a full training step per FFN type; vocab: the same as the vocabulary grows

def bench_step():
    vocab = 1024 if tiny else GPT2_VOCAB
    n_layer, n_embd, d_ff, B, T = step_shape("step")
    specs = [f"{v}@{vocab}" for v in ("stem", "swiglu", "moe")]  # the big table first: see lazy_zero_moments
    got = isolated(time_steps, "step", specs)
    if "error" in got:
        return failed("step", "step: one full training step", got["error"])
    ref = got[f"swiglu@{vocab}"]
    rows = []
    for spec in specs:
        r = got[spec]
        per_round = [a / b for a, b in zip(r["times_ms"], ref["times_ms"])]
        r["ratio_per_round"] = per_round
        rows.append([spec.split("@")[0], r["ms"], r["tokens_per_s"], None if r["mfu"] is None else f"{r['mfu']:.1%}",
                     statistics.median(per_round), f"{min(per_round):.2f}-{max(per_round):.2f}",
                     r["flops_per_token"] / ref["flops_per_token"], r["params"] / 1e6, r["active"] / 1e6, r["loss"]])
    notes = [f"{machine()}, {dtype}; {n_layer} layers, n_embd {n_embd}, d_ff {d_ff}, vocab {vocab}, default stem_layers "
             f"(1..{n_layer - 1}); batch {B} x {T} tokens of {source()}; eager (no torch.compile)",
             f"a step = train.train_step (forward, backward, clip, AdamW, + the row-wise AdamW of the sparse table), "
             f"the three variants alternating in one child process; {n_reps(3, 10)} rounds after {warmup} warm-up; "
             f"ratio = median over rounds of (variant / SwiGLU in the same round), range = lowest-highest round",
             "target (issue): STEM/SwiGLU <= 0.90, the median of 3 interleaved rounds"]
    if dev().type == "cpu" and not tiny:
        notes.append("a GPT-2-small step takes seconds on 2 CPU cores, hence few rounds; the row AdamW's moments are "
                     "committed only for the rows of the timed batches (lazy_zero_moments)")
    res = result("step", "step: one full training step", ["variant", "ms/step", "tokens/s", "MFU", "ratio to SwiGLU",
                 "ratio range", "FLOP ratio", "params (M)", "active/token (M)", "last loss"], rows, notes, got)
    return [res, got.pop("profile")] if profile else res


def bench_vocab():
    vocabs = (256, 1024, 4096) if tiny else (8192, 50304, 131072)
    n_layer, n_embd, d_ff, B, T = step_shape("vocab")
    raw = {}
    for group in ([f"{v}@{n}" for n in vocabs[::-1] for v in ("stem", "swiglu")], [f"stem_dense@{n}" for n in vocabs]):
        got = isolated(time_steps, "vocab", group)
        raw.update({s: {"error": got["error"]} for s in group} if "error" in got else got)
    ms = {spec: r.get("ms") for spec, r in raw.items()}
    rows, first = [], vocabs[0]
    for n in vocabs:
        sw, sp, de = ms[f"swiglu@{n}"], ms[f"stem@{n}"], ms[f"stem_dense@{n}"]
        rows.append([n, sw, sp, de, ratio(sp, sw), ratio(de, sw),
                     ratio(ratio(sp, sw), ratio(ms[f"stem@{first}"], ms[f"swiglu@{first}"])),
                     None if None in (sp, sw) else sp - sw, None if None in (de, sw) else de - sw])
    notes = [f"{machine()}, {dtype}; {n_layer} layers, n_embd {n_embd}, d_ff {d_ff}, default stem_layers; batch "
             f"{B} x {T} of {source()}, ids renumbered by frequency and folded where the vocabulary is smaller than "
             f"GPT-2's; median of {n_reps(3, 10)} rounds of train.train_step",
             "embedding and lm_head grow with the vocabulary in every model; what the table adds is 'sparse/SwiGLU' "
             f"and its growth 'vs {first}' (the lm_head's share divided out), or the extra ms",
             "stem (sparse table) and swiglu alternate in one child process; stem_dense (plain AdamW over the whole "
             "table) in another, so its ratios cross processes"]
    notes += [f"{s}: {r['error']}" for s, r in raw.items() if "error" in r]
    return result("vocab", "vocab: training step as the vocabulary grows",
                  ["vocab", "SwiGLU ms", "STEM sparse ms", "STEM dense ms", "sparse/SwiGLU", "dense/SwiGLU",
                   f"sparse/SwiGLU vs {first}", "sparse minus SwiGLU ms", "dense minus SwiGLU ms"], rows, notes, raw)


# ----------------------------------------------------------------------------------------------------------
# gather: the table's row gather against a plain copy of the same bytes

def bench_gather():
    n_layer, _, d_ff, B, T = step_shape("step")
    vocab, width = 1024 if tiny else GPT2_VOCAB, (n_layer - 1) * d_ff
    ids = torch.unique(host_batches(1, B, T, vocab)[0][0]).to(dev())
    n = ids.numel()
    log(f"gather: {n} rows of a {vocab} x {width} table")
    table = torch.full((vocab, width), 0.01, device=dev())
    src, dst, out = table[:n], torch.empty(n, width, device=dev()), torch.empty(n, width, device=dev())
    fns = {"memcpy (dst.copy_(src))": lambda: dst.copy_(src),
           "index_select into a buffer": lambda: torch.index_select(table, 0, ids, out=out),
           "index_select, new tensor (as lookup())": lambda: table.index_select(0, ids)}
    moved = 2 * n * width * 4  # bytes read + bytes written
    with torch.no_grad():
        medians, times = time_round_robin(fns, n_reps(30, 100))
    base = medians["memcpy (dst.copy_(src))"]
    rows = [[name, moved / 1e6, t * 1e3, moved / t / 1e9, base / t] for name, t in medians.items()]
    notes = [f"{machine()}; {n} distinct ids of a {B} x {T} batch ({source()}), rows of {n_layer - 1} layers x {d_ff} "
             f"float32 = {width * 4 / 1024:.0f} KiB each, from a {vocab} x {width} table ({vocab * width * 4 / 1e9:.2f}"
             f" GB); median of {n_reps(30, 100)} interleaved rounds",
             "bandwidth counts bytes read + written; the fraction is of the memcpy timed in the same rounds"]
    return result("gather", "gather: STEM row gather vs memcpy", ["operation", "MB moved", "ms (median)", "GB/s",
                  "fraction of memcpy"], rows, notes, {"times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})


# ----------------------------------------------------------------------------------------------------------
# sample: generation with and without the KV cache

def bench_sample():
    cuda = dev().type == "cuda"
    L, C, prompt_len, n_new, vocab = (2, 64, 32, 4, 1024) if tiny else (12, 768, 512, 128, GPT2_VOCAB) if cuda \
        else (6, 384, 512, 32, GPT2_VOCAB)
    torch.manual_seed(seed)
    with torch.device(dev()):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=2 * prompt_len, n_layer=L, n_head=C // 64, n_embd=C)).eval()
    if dtype != "float32":
        model.to(getattr(torch, dtype))  # the KV cache takes the weights' dtype
    prompt = host_batches(1, 1, prompt_len, vocab)[0][0].to(dev())
    fns = {"KV cache": lambda: model.generate(prompt, n_new, use_cache=True),
           "no cache": lambda: model.generate(prompt, n_new, use_cache=False),
           "prompt only": lambda: model.generate(prompt, 1, use_cache=True)}  # to split prefill from decode
    log(f"sample: {n_new} tokens after a {prompt_len}-token prompt, {L} layers, n_embd {C}")
    medians, times = time_round_robin(fns, n_reps(3, 10))
    cached, uncached, prefill = medians["KV cache"], medians["no cache"], medians["prompt only"]
    decode = (cached - prefill) / (n_new - 1)  # per token once the prompt is in the cache
    rows = [["no cache", uncached * 1e3, n_new / uncached, uncached * 1e3 / n_new, 1.0],
            ["KV cache", cached * 1e3, n_new / cached, cached * 1e3 / n_new, uncached / cached],
            ["KV cache, decoding only", None] + ([1 / decode, decode * 1e3, uncached / n_new / decode]
                                                 if decode > 0 else [None] * 3)]  # noise can beat a tiny run
    c = model.config
    notes = [f"{machine()}, {dtype}; STEM model: {c.n_layer} layers, n_embd {c.n_embd}, d_ff {c.d_ff}, vocab "
             f"{c.vocab_size}; batch 1; a {prompt_len}-token prompt of {source()}, {n_new} new tokens, temperature 1",
             "'no cache' and 'KV cache' time the whole model.generate call, prompt included; 'decoding only' = "
             "(KV cache - a 1-token generate) / (new tokens - 1), the steady per-token cost"]
    return result("sample", "sample: generation speed with and without the KV cache", ["mode", "ms per generate",
                  "new tokens/s", "ms/token", "speedup over no cache"], rows, notes,
                  {"times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})


# ----------------------------------------------------------------------------------------------------------
# capacity: parameters active per sequence as the context grows (arithmetic on real text)

def bench_capacity():
    shape = dict(vocab_size=1024, n_layer=2, n_head=1, n_embd=64, d_ff=128, block_size=64) if tiny else \
        dict(vocab_size=GPT2_VOCAB, n_layer=12, n_head=12, n_embd=768, d_ff=2048, block_size=1024)
    contexts = (16, 32, 64) if tiny else (128, 256, 512, 1024)
    with torch.device("meta"):
        stem, dense = GPT(GPTConfig(ffn="stem", **shape)), GPT(GPTConfig(ffn="swiglu", **shape))
    c, n_stem = stem.config, len(stem.config.stem_layers)
    base = stem.active_params_per_token() - stem.stem_table.size(1)  # all a token touches but its own table row
    data = text_tokens(c.vocab_size)
    rows, raw = [], {}
    for L in contexts:
        ordered = data[:len(data) // L * L].view(-1, L).sort(dim=1).values  # non-overlapping windows
        distinct = ((ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1).double()
        mean, active = distinct.mean().item(), base + distinct.mean().item() * n_stem * c.d_ff
        raw[L] = {"windows": distinct.numel(), "distinct_mean": mean, "distinct_std": distinct.std().item()}
        rows.append([L, distinct.numel(), mean, mean / L, round(mean * n_stem), active / 1e6,
                     dense.active_params_per_token() / 1e6, active / dense.active_params_per_token(),
                     active / stem.num_params()])
    notes = [f"{source()}, {len(data):,} tokens tiled into non-overlapping windows of each length",
             f"STEM = {c.n_layer} layers, n_embd {c.n_embd}, {n_stem} STEM layers, d_ff {c.d_ff}, vocab {c.vocab_size}: "
             f"{stem.num_params() / 1e6:.0f}M parameters, {stem.active_params_per_token() / 1e6:.1f}M active per token; "
             f"per sequence = {base / 1e6:.1f}M (all but the table) + distinct tokens x {n_stem} x {c.d_ff}",
             f"dense = the same shape with SwiGLU: {dense.num_params() / 1e6:.1f}M parameters, all active at any context"]
    return result("capacity", "capacity: parameters active per sequence vs context length",
                  ["context", "windows", "distinct tokens", "distinct/context", "table rows touched",
                   "STEM active/seq (M)", "dense active/seq (M)", "STEM/dense", "STEM active/total"], rows, notes, raw)


# ----------------------------------------------------------------------------------------------------------
# offload: bytes the host-resident table moves per step, measured; then projected for GPT-2 small on a GPU

def row_traffic(batches):
    """Per batch: distinct ids, and how many of them the previous batch also had (rows its update changed)."""
    ids = [torch.unique(x) for x, _ in batches]
    return [i.numel() for i in ids], [0] + [int(torch.isin(ids[k], ids[k - 1]).sum()) for k in range(1, len(ids))]


def bench_offload():
    n_steps = 3 if tiny else 6
    vocab = 1024 if tiny else GPT2_VOCAB
    settings = {**model_settings("stem", vocab, "vocab"), "stem_offload": True}
    B, T, d_ff, n_stem = settings["batch_size"], settings["block_size"], settings["d_ff"], settings["n_layer"] - 1
    batches = host_batches(n_steps, B, T, vocab, offset=1)
    run = trainer(batches, **settings)
    for _ in range(n_steps):
        run.step()
    run.rows_opt.flush()
    row_bytes = n_stem * d_ff * 4
    # train.micro_batches draws (and prefetches) one batch ahead: n_steps + 1 batches, the last = batches[0]
    distinct, overlap = row_traffic(batches + batches[:1])
    m = {"steps": n_steps, "to_device": run.rows_opt.bytes_to_device / n_steps,
         "to_host": run.rows_opt.bytes_to_host / n_steps, "distinct": statistics.mean(distinct[:-1]),
         "expected_to_device": (sum(distinct) + sum(overlap)) * row_bytes / n_steps,
         "expected_to_host": sum(distinct[:-1]) * row_bytes / n_steps}
    measured = [[f"{settings['n_layer']} layers, n_embd {settings['n_embd']}, d_ff {d_ff}, vocab {vocab}", f"{B} x {T}",
                 m["distinct"], m["to_device"] / 1e6, m["expected_to_device"] / 1e6,
                 m["to_device"] / m["expected_to_device"], m["to_host"] / 1e6, m["expected_to_host"] / 1e6]]
    notes = [f"OffloadedRowAdamW's counters (bytes_to_device, bytes_to_host) over {n_steps} train.train_step calls "
             f"with stem_offload=True on {source()}; a row is {n_stem} x {d_ff} float32",
             "expected H2D = every batch's distinct rows once (prefetched, the one drawn ahead included) + the rows "
             "the previous step updated after that prefetch (re-copied); D2H = one merged gradient per distinct row; "
             "H2D/expected above 1 means rows are gathered more than once"]
    res = result("offload", "offload: bytes per training step with the STEM table in host memory (measured)",
                 ["model", "batch", "distinct rows/step", "H2D MB/step", "expected H2D MB", "H2D/expected",
                  "D2H MB/step", "expected D2H MB"], measured, notes, m)
    with torch.device("meta"):
        big = GPT(GPTConfig(vocab_size=GPT2_VOCAB, n_layer=12, n_head=12, n_embd=768, d_ff=2048))
    row_mb, proj = big.stem_table.size(1) * 4 / 1e6, []
    for Bp in (2, 4) if tiny else (4, 8, 12):  # 12 x 1024: config/train_gpt2_small_stem.py's micro-batch
        distinct, overlap = row_traffic(host_batches(16 if tiny else 64, Bp, 1024, GPT2_VOCAB, offset=3))
        d, o = statistics.mean(distinct), statistics.mean(overlap[1:])
        copy_ms = row_mb / (pcie_gb_s * 1e3) * 1e3
        compute_ms = big.flops_per_token(1024) * Bp * 1024 / (peak_tflops * 1e12 * mfu_assumed) * 1e3
        proj.append([f"{Bp} x 1024", d, o, d * row_mb, o * row_mb, d * copy_ms, (d + o) * copy_ms, compute_ms,
                     "yes" if d * copy_ms < compute_ms else "no", (d + o) * copy_ms / compute_ms])
    notes = [f"GPT-2-small STEM (12 layers, 768, d_ff 2048, 11 STEM layers, rows of {row_mb * 1e3 / 1024:.0f} KiB) on "
             f"{source()}, mean over random batches; copies at {pcie_gb_s:g} GB/s each way; compute = "
             f"{big.flops_per_token(1024) / 1e9:.2f} GFLOP/token at {peak_tflops:g} TFLOP/s x {mfu_assumed:.0%} MFU",
             "the prefetch copy runs on its own stream while the previous step computes; the gradients' D2H and the "
             "re-copy of updated rows wait on the step (exposed) unless the host update keeps ahead",
             "measured on a GPU by python bench.py --what=gpu (offload vs on-device step time)"]
    return [res, result("offload_projection", "offload: projected copy time vs compute, GPT-2-small STEM on a GPU",
                        ["batch", "distinct rows", "rows also in previous batch", "prefetch H2D MB", "re-copy H2D MB",
                         "prefetch ms", "exposed ms (D2H + re-copy)", "compute ms", "prefetch hides?",
                         "exposed/compute"], proj, notes)]


# ----------------------------------------------------------------------------------------------------------
# quality: SwiGLU, STEM, STEM on half the layers and MoE trained alike through train.py

def bench_quality():
    settings = {}
    with open(quality_config) as f:
        exec(f.read(), {}, settings)  # what the config assigns, for the notes and n_layer
    variants = {"swiglu": ["--ffn=swiglu"], "stem": ["--ffn=stem"], "moe": ["--ffn=moe"],
                "stem_half": ["--ffn=stem", f"--stem_layers={list(range(1, settings['n_layer'], 2))}".replace(" ", "")]}
    runs, rows = {}, []
    for name, args in variants.items():
        out = os.path.join(quality_out, name)
        cmd = [sys.executable, "train.py", quality_config, *args, f"--out_dir={out}", f"--device={device}",
               f"--dtype={dtype}", *quality_extra.split()]
        log("quality: " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # train.py has no such key
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if proc.returncode != 0:
            runs[name] = {"error": (proc.stdout.strip().splitlines() or ["failed"])[-1]}
            rows.append([name, "failed: " + runs[name]["error"]] + [None] * 8)
            continue
        records = [jsonlib.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        train_l = [(r["iter"], r["loss"]) for r in records if "loss" in r]
        val = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
        ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", mmap=True, weights_only=True)
        with torch.device("meta"):
            model = GPT(GPTConfig(**ckpt["model_args"]))
        jump, at = max(((b - a, it) for (_, a), (it, b) in zip(train_l, train_l[1:])), default=(0.0, None))
        runs[name] = {"cmd": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0, "train": train_l, "val": val}
        rows.append([name, val[-1][1], min(v for _, v in val), train_l[-1][1], jump, at, model.num_params() / 1e6,
                     model.active_params_per_token() / 1e6, model.flops_per_token(model.config.block_size) / 1e6,
                     runs[name]["wall_s"]])
    notes = [f"{quality_config} ({', '.join(f'{k}={v}' for k, v in settings.items())}) {quality_extra} for every "
             f"variant; each trains through train.py in its own process, out_dir {quality_out}/<variant>",
             "val loss: train.py's final evaluation (and the best one); jump: the largest rise of the train loss "
             "between consecutive logged steps, and the step it happened at",
             f"{machine()}, {dtype}; wall time includes start-up and evaluations"]
    return result("quality", "quality: small models trained alike on Shakespeare",
                  ["variant", "val loss", "best val", "last train loss", "largest jump", "at step", "params (M)",
                   "active/token (M)", "MFLOPs/token", "wall s"], rows, notes, runs)


# ----------------------------------------------------------------------------------------------------------
# gpu: the one GPU check. Every part records its own error and the others go on.

def gpu_parity():
    """model.STEM forward + backward, Triton vs torch, on one real batch at fp32 and under bf16 autocast; and two
    Triton runs compared bit for bit. The layer reads the second column block of two (a strided view, as in GPT)."""
    d, f, B, T, vocab = (64, 128, 2, 64, 1024) if tiny else (768, 2048, 8, 1024, GPT2_VOCAB)
    cfg = GPTConfig(vocab_size=vocab, n_layer=1, n_head=max(1, d // 64), n_embd=d, d_ff=f, stem_layers=[0])
    torch.manual_seed(seed)
    with torch.device(dev()):
        layer, table = STEM(cfg, 1), torch.randn(vocab, 2 * f) * (2 / (vocab + f)) ** 0.5  # xavier's scale
        x, grad_y = torch.randn(B, T, d), torch.randn(B, T, d)
    idx = host_batches(1, B, T, vocab)[0][0].to(dev())

    def run(fused, amp):
        ids, inverse = torch.unique(idx, return_inverse=True)
        rows, xx = table[ids].requires_grad_(True), x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast(dev().type, dtype=torch.bfloat16) if amp else nullcontext():
            y = layer(xx, StemRows(rows, inverse, ids, layers=rows.split(f, dim=1), fused=fused))
        y.backward(grad_y.to(y.dtype))
        sync()
        return {"output": y, "grad x": xx.grad, "grad rows": rows.grad, "grad w_gate": layer.w_gate.weight.grad,
                "grad w_down": layer.w_down.weight.grad}

    rows = []
    for amp in (False, True):
        ref, tri, again = run(False, amp), run(True, amp), run(True, amp)
        tol = 2e-2 if amp else 1e-4
        for k in ref:
            err = (tri[k].float() - ref[k].float()).abs().max().item() / max(ref[k].float().abs().max().item(), 1e-30)
            rows.append(["bf16 autocast" if amp else "fp32", k, err, tol, err <= tol, torch.equal(tri[k], again[k])])
    notes = [f"{machine()}; d_model {d}, d_ff {f}, {B} x {T} ids of {source()} ({torch.unique(idx).numel()} distinct)",
             "error = max |Triton - torch| / max |torch| per tensor; bit-identical: a second Triton run equals the "
             "first exactly (no atomics in the backward)"]
    return result("gpu_parity", "gpu: Triton vs torch STEM layer, forward and backward",
                  ["precision", "tensor", "relative error", "tolerance", "within", "bit-identical rerun"], rows, notes)


def gpu_kernel():
    """The Triton op's forward and backward alone (and torch's), and their effective bandwidth against a
    device-to-device copy timed in the same run."""
    f, B, T, vocab, n_stem = (128, 2, 64, 1024, 2) if tiny else (2048, 8, 1024, GPT2_VOCAB, 11)
    _, inverse = torch.unique(host_batches(1, B, T, vocab)[0][0].to(dev()), return_inverse=True)
    inverse = inverse.flatten()
    torch.manual_seed(seed)
    R = int(inverse.max()) + 1
    rows = torch.randn(R, n_stem * f, device=dev())[:, :f]  # one layer's column block of the batch's rows
    big = torch.empty(2 ** (22 if tiny else 28), device=dev())  # 1 GiB of float32
    copy_to = torch.empty_like(big)
    out, results = [], {}
    for gdt in (torch.bfloat16, torch.float32):
        gate = torch.randn(B * T, f, device=dev(), dtype=gdt)
        grad_h, gate_leaf = torch.randn_like(gate), gate.clone().requires_grad_(True)
        rows_leaf = rows.clone().requires_grad_(True)

        def torch_fwd_bwd():
            h = F.silu(gate_leaf) * F.embedding(inverse, rows_leaf).to(gdt)
            torch.autograd.grad(h, (gate_leaf, rows_leaf), grad_h)

        fns = {"copy (1 GiB, device to device)": lambda: copy_to.copy_(big),
               "triton forward": lambda: stem_ops.silu_mul_rows(gate, rows, inverse),
               "triton backward": lambda: stem_ops.silu_mul_rows_backward(grad_h, gate, rows, inverse),
               "torch forward": lambda: F.silu(gate) * F.embedding(inverse, rows).to(gdt),
               "torch forward + backward": torch_fwd_bwd}
        g_bytes, r_bytes = gate.numel() * gate.element_size(), R * f * 4
        moved = {"copy (1 GiB, device to device)": 2 * big.numel() * 4, "triton forward": 2 * g_bytes + r_bytes,
                 "triton backward": 3 * g_bytes + 2 * r_bytes, "torch forward": 2 * g_bytes + r_bytes,
                 "torch forward + backward": 5 * g_bytes + 3 * r_bytes}
        with torch.no_grad():
            medians, _ = time_round_robin({k: v for k, v in fns.items() if k != "torch forward + backward"}, n_reps(5))
        medians.update(time_round_robin({"torch forward + backward": torch_fwd_bwd}, n_reps(5))[0])
        copy_bw = moved["copy (1 GiB, device to device)"] / medians["copy (1 GiB, device to device)"]
        for name, t in medians.items():
            out.append([str(gdt).replace("torch.", ""), name, t * 1e3, moved[name] / 1e6, moved[name] / t / 1e9,
                        moved[name] / t / copy_bw])
        results[str(gdt)] = {"copy_GB_s": copy_bw / 1e9, "ms": {k: v * 1e3 for k, v in medians.items()}}
    del big, copy_to
    notes = [f"{machine()}; one layer: gate [{B * T}, {f}], {R} distinct rows of {source()} (a column block of "
             f"[{R}, {n_stem * f}] float32 rows); median of {n_reps(5)} interleaved rounds",
             "bytes = compulsory traffic: forward reads gate and each distinct row once, writes the output; backward "
             "reads gate, grad_h and the rows, writes grad_gate and grad_rows (the chunk partials not counted); "
             "torch's forward + backward counted as its two passes; copy = bytes read + written",
             "fraction = effective bandwidth / the copy's bandwidth measured in the same rounds"]
    return result("gpu_kernel", "gpu: silu_mul_rows time and effective bandwidth", ["gate dtype", "operation", "ms",
                  "MB moved", "GB/s", "fraction of copy"], out, notes, results)


def gpu_train():
    """GPT-2-small train steps through train.py with torch.compile: STEM (rows on the device), SwiGLU and STEM
    with the table in host memory (stem_offload), built one after another (peak memory each: its own build and
    warm-up steps), then timed round-robin. A variant that fails is dropped with its error; the rest go on."""
    L, C, f, B, T, vocab = (2, 64, 128, 2, 64, 1024) if tiny else (12, 768, 2048, 8, 1024, GPT2_VOCAB)
    cuda = dev().type == "cuda"
    for key in ("recompile_limit", "cache_size_limit"):  # three models, and R (distinct rows) varies: dynamic
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)
    batches = host_batches(8, B, T, vocab, offset=4)
    common = dict(vocab_size=vocab, n_layer=L, n_head=max(1, C // 64), n_embd=C, d_ff=f, batch_size=B, block_size=T,
                  compile=cuda, dtype="bfloat16", learning_rate=LR)
    variants = {"stem": dict(ffn="stem"), "swiglu": dict(ffn="swiglu"), "stem offloaded": dict(ffn="stem",
                                                                                              stem_offload=True)}
    runs, info, errors = {}, {}, {}

    def attempt(name, fn):
        try:
            fn()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
            log(f"gpu train: {name} failed:\n{traceback.format_exc()}")
            runs.pop(name, None)

    def build(name):
        base = torch.cuda.memory_allocated(dev()) if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev())
        t0 = time.perf_counter()
        run = trainer(batches, **common, **variants[name])
        for _ in range(max(warmup, 3)):  # compile, recompile with a dynamic row count, one steady step
            run.losses.append(run.step()[0])
        sync()
        info[name] = {"build_and_warmup_s": time.perf_counter() - t0, "times_ms": [],
                      "peak_gb": (torch.cuda.max_memory_allocated(dev()) - base) / 1e9 if cuda else None}
        runs[name] = run

    for name in variants:
        log(f"gpu train: building and warming up {name}")
        attempt(name, lambda: build(name))

    def timed(name):
        sync()
        t0 = time.perf_counter()
        runs[name].losses.append(runs[name].step()[0])
        sync()
        info[name]["times_ms"].append((time.perf_counter() - t0) * 1e3)

    for r in range(n_reps(3, 10)):
        names = list(runs)
        for name in names[r % max(1, len(names)):] + names[:r % max(1, len(names))]:
            attempt(name, lambda: timed(name))
    if "stem offloaded" in runs:
        attempt("stem offloaded", runs["stem offloaded"].rows_opt.flush)  # raises a failed host job
    rows = []
    for name in variants:
        if name in errors or name not in info or not info[name]["times_ms"]:
            rows.append([name, "failed: " + errors.get(name, "no timed steps")] + [None] * 5)
            continue
        ms, model = statistics.median(info[name]["times_ms"]), runs[name].model
        mfu = model.estimate_mfu(B * T / ms * 1e3, dev(), seq_len=T)
        sw = info.get("swiglu", {}).get("times_ms")
        info[name].update(ms=ms, tokens_per_s=B * T / ms * 1e3, mfu=mfu, losses=runs[name].losses)
        rows.append([name, ms, B * T / ms * 1e3, None if mfu is None else f"{mfu:.1%}", info[name]["peak_gb"],
                     statistics.median(a / b for a, b in zip(info[name]["times_ms"], sw)) if sw else None,
                     model.flops_per_token(T) / 1e9])
    notes = [f"{machine()}; {L} layers, n_embd {C}, d_ff {f}, vocab {vocab}, batch {B} x {T} of {source()}; "
             f"bfloat16 autocast, torch.compile; median of {n_reps(3, 10)} round-robin steps after "
             f"{max(warmup, 3)} warm-up steps each",
             "peak GB = torch.cuda.max_memory_allocated during the variant's build and warm-up, less what was allocated "
             "before it (the variants built earlier); the offloaded table and its moments are in host memory"]
    notes += [f"{k}: {v}" for k, v in errors.items()]
    out = [result("gpu_train", "gpu: GPT-2-small training step, compiled", ["variant", "ms/step", "tokens/s", "MFU",
                  "peak GB", "ratio to SwiGLU", "GFLOP/token"], rows, notes, {"info": info, "errors": errors})]
    if "stem" in info and "stem offloaded" in info and "losses" in info["stem"] and "losses" in info["stem offloaded"]:
        a, b = info["stem"]["losses"], info["stem offloaded"]["losses"]
        diff = [abs(x - y) for x, y in zip(a, b)]
        out.append(result("gpu_offload_parity", "gpu: loss parity, offloaded table vs on the device",
                          ["steps", "max abs loss difference", "bit-identical steps", "first loss", "last loss"],
                          [[len(diff), max(diff), sum(d == 0 for d in diff), a[0], a[-1]]],
                          ["the same initial weights and batches; the row AdamW runs on the host in one and on the GPU "
                           "in the other, so the last bits may differ after the first update"]))
    return out


def bench_gpu():
    out = []
    for name, part in (("parity", gpu_parity), ("kernel", gpu_kernel), ("train", gpu_train)):
        t0 = time.perf_counter()
        try:
            got = part()
            out += got if isinstance(got, list) else [got]
        except Exception as e:
            log(f"gpu {name} failed:\n{traceback.format_exc()}")
            out.append(failed(f"gpu_{name}", f"gpu: {name}", f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]))
        out[-1]["seconds"] = time.perf_counter() - t0
        if dev().type == "cuda":
            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------------------

BENCHES = {"ffn": bench_ffn, "step": bench_step, "vocab": bench_vocab, "gather": bench_gather,
           "sample": bench_sample, "capacity": bench_capacity, "offload": bench_offload, "quality": bench_quality,
           "gpu": bench_gpu}


def parse_settings(argv):
    settings, _ = configurator.parse(argv, DEFAULTS, {}, __file__, __doc__)
    if settings["what"] not in ("all", *BENCHES):
        raise ConfigError(f"what must be all or one of {', '.join(BENCHES)}, got {settings['what']!r}")
    return settings


def apply(settings):
    globals().update(settings)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)


def main(argv):
    settings = parse_settings(argv)
    if settings["what"] == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("--what=gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
        settings.update(device="cuda", dtype="bfloat16")
        settings["json"] = settings["json"] or os.path.join(os.environ.get("OUT", ""), "bench_gpu.json")
    apply(settings)
    names = [w for w in BENCHES if w not in ("quality", "gpu")] if what == "all" else [what]
    results, t_start = {}, time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        out = BENCHES[name]()
        for res in out if isinstance(out, list) else [out]:
            res.setdefault("seconds", time.perf_counter() - t0)
            results[res["name"]] = res
            print_result(res)
        log(f"{name}: {time.perf_counter() - t0:.0f} s")
    print(f"\n{', '.join(names)}: {time.perf_counter() - t_start:.0f} s in all (python bench.py {' '.join(argv)})")
    if json:
        versions = {"torch": torch.__version__, "triton": getattr(stem_ops.triton, "__version__", None)}
        with open(json, "w") as f:
            jsonlib.dump({"settings": {k: globals()[k] for k in DEFAULTS}, "machine": machine(), "versions": versions,
                          **results}, f, indent=1, default=str)
        log(f"wrote {json}")
    return results


if __name__ == "__main__":
    configurator.run_main(lambda: main(sys.argv[1:]), "bench.py")
