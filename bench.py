"""
Benchmarks for stem-gpt: what STEM costs and saves next to SwiGLU and MoE, as markdown tables and --json=FILE.
`python bench.py` runs all but shard, quality and gpu; --what=NAME one of them; --tiny=True toy sizes everywhere;
--what=gpu is the GPU check (<= 10 min on one H100). figures.py draws docs/*.png from the quality runs.
Timing: `warmup` untimed rounds, then `reps` rounds in which the variants take turns (round-robin, the first one
rotating), so a busy machine's slow phases fall on all alike; a figure is the median of its rounds: compare ratios
within one run, not times across runs.
"""

import contextlib
import dataclasses
import gc
import itertools
import json as jsonlib
import math
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from types import GeneratorType, SimpleNamespace

# Transparent huge pages, so each step's big temporaries (logits, their gradient) are not page-faulted in anew
# (measured: 26x the faults, +16% step time). torch reads it once: set before its import; the user's value wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import configurator
import prepare
import stem_ops
import stem_sparse
import train
from configurator import ConfigError
from model import GPT, GPTConfig, MoE, STEM, StemRows, SwiGLU

# ----------------------------------------------------------------------------------------------------------
# settings (config/*.py files and --key=value, see configurator.py; python bench.py --help lists them)
what = "all"  # "all": every part but shard, quality and gpu; or one part's name (BENCHES, at the end)
device = "cuda" if torch.cuda.is_available() else "cpu"  # where ffn..offload run; gpu always uses cuda
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # or "float32"
reps = 0  # timed rounds per measurement; 0: each one's own default (fewer where a call takes seconds)
warmup = 1  # untimed rounds first (gpu: at least 3 training steps, for torch.compile)
threads = 0  # torch CPU threads; 0: torch's default (one per core). On a busy machine 1 is far steadier
seed = 1337
data_dir = "data/shakespeare"  # val.bin from `python prepare.py`; without it, Zipfian token ids stand in
json = ""  # write the results here; gpu's default: $OUT/bench_gpu.json if OUT is set, else bench_gpu.json
tiny = False  # toy shapes everywhere: the smoke test, and a quick check that everything runs
quality_config = "config/quality_shakespeare.py"  # quality: the shared train.py config; variants differ in ffn
quality_out = "out/quality"  # quality: each variant trains in quality_out/<variant>
quality_extra = ""  # quality: more train.py settings for every variant, e.g. "--seed=1338" (space separated)
shard_out = "out/shard"  # shard: each run of the comparison trains in shard_out/<run>
quality_variants = "swiglu,stem,moe,stem_half"  # quality: which to train, comma separated, or "all" (adds bf16 ...)
gpu_budget_s = 480.0  # gpu: the training variants not started within this many seconds are skipped
DEFAULTS = configurator.defaults_of(globals())
GPT2_VOCAB = 50304
LR = 6e-4  # the learning rate of every timed training step
PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_gpt2_small_stem.py")

def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)

def on_gpu():
    return torch.device(device).type == "cuda"

def sync():
    torch.cuda.synchronize(device) if on_gpu() else None

def autocast(on=None):  # bf16 autocast: as dtype says, or as `on` says
    on = dtype != "float32" if on is None else on
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

def n_reps(cpu_default, gpu_default=20):
    return reps or (2 if tiny else gpu_default if on_gpu() else cpu_default)

ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
in_ms = lambda times: {k: [t * 1e3 for t in v] for k, v in times.items()}  # noqa: E731

def one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]

def data_args():  # data_dir as train.py's two settings
    return [f"--data_dir={os.path.dirname(data_dir)}", f"--dataset={os.path.basename(data_dir)}"]

def source():
    return "Shakespeare validation text" if os.path.exists(os.path.join(data_dir, "val.bin")) else "Zipfian ids"

def cpu_seconds():  # this process and its reaped children (prepare's workers end with each call)
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))

def time_round_robin(fns, rounds, cpu=None):
    """(median, every round's) seconds per call of each fn, round r starting at the r-th; cpu: CPU s, warm-up too."""
    names, times, cpu = list(fns), {name: [] for name in fns}, {} if cpu is None else cpu
    for r in range(-warmup, rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            c0, t0 = cpu_seconds(), time.perf_counter()
            fns[name]()
            sync()
            if r >= 0:
                times[name].append(time.perf_counter() - t0)
            cpu.setdefault(name, []).append(cpu_seconds() - c0)
    return {name: statistics.median(t) for name, t in times.items()}, times

def text_tokens(vocab, _cache={}):
    """val.bin as int64 ids < vocab (else 500k Zipfian ids); a small vocab renumbers by frequency, tail folded."""
    if vocab not in _cache:
        path, rng, p = os.path.join(data_dir, "val.bin"), np.random.default_rng(seed), 1 / np.arange(1, 50258) ** 1.1
        data = np.asarray(prepare.read_tokens(data_dir, "val"), dtype=np.int64) if os.path.exists(path) else \
            rng.permutation(50257)[rng.choice(50257, size=500_000, p=p / p.sum())]
        if data.max() >= vocab:  # rank[id]: how many ids are more frequent
            data = np.argsort(np.argsort(-np.bincount(data), kind="stable"))[data] % vocab
        _cache[vocab] = torch.from_numpy(data)
    return _cache[vocab]

def host_batches(n, B, T, vocab, offset=0):
    """n batches (x, y) of B random windows of T tokens, y = x shifted by one, in host memory."""
    data = text_tokens(vocab)
    starts = torch.randint(len(data) - T - 1, (n, B), generator=torch.Generator().manual_seed(seed + offset))
    return [(torch.stack([data[s:s + T] for s in row]), torch.stack([data[s + 1:s + T + 1] for s in row]))
            for row in starts.tolist()]

def shape(s):
    return (f"{s['n_layer']} layers, n_embd {s['n_embd']}, d_ff {s['d_ff']}, vocab {s['vocab_size']}; batch "
            f"{s['batch_size']} x {s['block_size']} of {source()}")

def result(name, title, columns, rows, notes=(), raw=None):  # the machine, as it was then, is the first note
    return {"name": name, "title": title, "columns": columns, "rows": rows, "notes": [machine(), *notes], "raw": raw}

def fmt(v):
    if v is None or isinstance(v, (bool, str)) or not isinstance(v, int) and not math.isfinite(v):
        return "n/a" if v is None else str(v)
    a = abs(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else \
        f"{v:.2f}" if a >= 1 else f"{v:.3g}"

def print_result(res):
    print(f"\n### {res['title']}\n\n| " + " | ".join(res["columns"]) + " |\n|" + "---|" * len(res["columns"]))
    print("\n".join("| " + " | ".join(fmt(v) for v in row) + " |" for row in res["rows"]))
    print("".join(f"\n- {note}" for note in res["notes"]), flush=True)

def machine():
    return f"{torch.cuda.get_device_name(device)}, {dtype}" if on_gpu() else f"CPU, {dtype}, " \
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"

def layer_rows(rows, inverse, ids, width, fused):
    """The StemRows a lone STEM layer reads, as GPT.forward builds them: column blocks of width, the plan."""
    plan = stem_ops.backward_plan(inverse, rows.size(0)) if fused else ()
    return StemRows(rows, inverse, ids, layers=rows.split(width, dim=1), fused=fused, plan=tuple(plan))

def free_memory():  # drop compiled graphs and cycles, so the next peak-memory reading is its own
    torch._dynamo.reset()
    gc.collect()
    if on_gpu():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

def trainer(settings, n_batches=4, offset=0):
    """train.py's model and optimizers for these settings; .step(): one train.train_step -> (loss, grad norm)."""
    settings = {"device": device, "dtype": dtype, "seed": seed, **settings}
    cfg = train.configure([f"--{k}={v}" for k, v in settings.items()])
    train.validate(cfg)
    train.setup_distributed(cfg)
    batches = host_batches(n_batches, cfg.batch_size, cfg.block_size, cfg.vocab_size, offset)
    model = train.build_model(cfg)
    optimizer, rows_opt = train.build_optimizers(cfg, model)
    compiled = torch.compile(model) if cfg.compile else model
    def draw(step, micro):  # as train.get_batch hands a batch over: (x on the host, x, y on the device)
        x, y = batches[(step * cfg.micro_steps + micro) % len(batches)]
        to = (lambda t: t.pin_memory().to(cfg.device, non_blocking=True)) if cfg.device_type == "cuda" else lambda t: t
        return x, to(x), to(y)
    stream = train.micro_batches(cfg, rows_opt, 0, draw=draw)
    return SimpleNamespace(cfg=cfg, model=model, rows_opt=rows_opt, losses=[], batches=batches,
                           step=lambda: train.train_step(cfg, compiled, optimizer, rows_opt, stream, LR))

def model_settings(variant, vocab, kind):
    """train.py settings of variant: GPT-2 small for step and gather, else smaller (a dense 131k-row table: 60 GB)."""
    L, C, f, B, T = (2, 64, 128, 2, 32) if tiny else (4, 256, 704, 4, 256) if kind not in ("step", "gather") else \
        (12, 768, 2048, 8, 1024) if on_gpu() else (12, 768, 2048, 4, 256)
    return dict(ffn=variant.split("_")[0], stem_optim="dense" if variant == "stem_dense" else "sparse",
                vocab_size=vocab, n_layer=L, n_head=max(1, C // 64), n_embd=C, d_ff=f, batch_size=B, block_size=T)

def time_steps(settings, warm=0):
    """Training steps of each of {name: train.py settings}, round-robin in this process, after `warm` untimed ones
    each (torch.compile's: compile, recompile, steady): ms, MFU, the model's accounting, every loss."""
    runs = {name: trainer(s) for name, s in settings.items()}
    log(f"{n_reps(3, 10)} rounds of {', '.join(runs)} (process {os.getpid()})")
    fns = {s: lambda r=r: r.losses.append(r.step()[0]) for s, r in runs.items()}
    try:
        for r in runs.values():
            r.losses += [r.step()[0] for _ in range(warm)]
        medians, times = time_round_robin(fns, n_reps(3, 10))
    finally:  # the host optimizers' threads end either way; a failed host job raises here
        for opt in [r.rows_opt for r in runs.values() if r.rows_opt is not None]:
            opt.close()
    out = {}
    for s, r in runs.items():
        T, tps = r.cfg.block_size, r.cfg.batch_size * r.cfg.block_size / medians[s]
        out[s] = {"ms": medians[s] * 1e3, "times_ms": [t * 1e3 for t in times[s]], "tokens_per_s": tps,
                  "mfu": r.model.estimate_mfu(tps, device, seq_len=T), "params": r.model.num_params(),
                  "active": r.model.active_params_per_token(), "flops_per_token": r.model.flops_per_token(T),
                  "loss": r.losses[-1], "losses": r.losses}
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
        return {"error": one_line(e)}

def bench_ffn():
    """SwiGLU, model.STEM and MoE modules, forward + backward at d 768, d_ff 2048, 2048 tokens."""
    d, f, B, T, vocab = (64, 128, 4, 64, 1024) if tiny else (768, 2048, 8, 256, GPT2_VOCAB)
    cfg = GPTConfig(vocab_size=vocab, n_layer=1, n_head=max(1, d // 64), n_embd=d, d_ff=f, stem_layers=[0])
    with torch.device(device):
        modules = {"swiglu": SwiGLU(d, f), "stem": STEM(cfg, 0), "moe": MoE(dataclasses.replace(cfg, ffn="moe"))}
        table = torch.nn.Parameter(torch.nn.init.xavier_normal_(torch.empty(vocab, f)))  # one layer's, as GPT's
        x, grad_y, one = torch.randn(B, T, d, requires_grad=True), torch.randn(B, T, d), torch.ones(())
    lookup = stem_sparse.SparseRowAdamW(table).lookup  # a training step's per-batch work: unique, rows as a leaf
    batches = itertools.cycle([xb.to(device) for xb, _ in host_batches(8, B, T, vocab)])
    def fwd_bwd(name, kernel=None):
        x.grad = None
        modules[name].zero_grad(set_to_none=True)
        if kernel:
            r = lookup(next(batches))
            rows = layer_rows(r.rows, r.inverse, r.ids, f, stem_ops.use_triton(kernel, device))
        with autocast():
            out = modules[name](x, rows) if kernel else modules[name](x)
        outs = out if isinstance(out, tuple) else (out,)  # MoE: (y, aux loss)
        torch.autograd.backward(outs, (grad_y, one)[:len(outs)])
    names = ["swiglu", "stem/torch", "moe"] + ["stem/triton"] * (on_gpu() and stem_ops.triton is not None)
    fns = {n: lambda n=n: fwd_bwd(*n.split("/")) for n in names}  # "ffn/kernel"
    medians, times = time_round_robin(fns, n_reps(10, 50))
    with torch.device("meta"):  # each FFN's matmul weights: a one-layer model's, less lm_head and attention
        models = {k: GPT(dataclasses.replace(cfg, ffn=k, block_size=64)) for k in ("swiglu", "stem", "moe")}
    counts = {k: m.matmul_params_per_token() - m.lm_head.weight.numel() - 4 * d * d for k, m in models.items()}
    rows = [[*(n + "/-").split("/")[:2], t * 1e3, ratio(t, medians["swiglu"]),
             counts[n.split("/")[0]] / counts["swiglu"]] for n, t in medians.items()]
    notes = [f"d_model {d}, d_ff {f}, {B} x {T} tokens of {source()}; median of {n_reps(10, 50)} rounds; STEM fed "
             "SparseRowAdamW.lookup's rows; MoE: 8 experts of d_ff/2, top-2"]
    return result("ffn", "ffn: one FFN layer, forward + backward", ["FFN", "kernel", "ms (median)", "ratio to SwiGLU",
                 "FLOP ratio (model accounting)"], rows, notes, in_ms(times))

def bench_step():
    """A GPT-2-small training step (train.train_step), STEM (sparse table) vs SwiGLU; MoE: no room in 23 GB."""
    vocab = 1024 if tiny else GPT2_VOCAB
    specs = [f"{v}@{vocab}" for v in ("stem", "swiglu")]
    got, rows = isolated(time_steps, {spec: model_settings(*spec.split("@"), "step") for spec in specs}), []
    if "error" in got:
        return result("step", "step: failed", ["error"], [[got["error"]]])
    for spec, r, ref in ((spec, got[spec], got[f"swiglu@{vocab}"]) for spec in specs):
        per_round = r["ratio_per_round"] = [a / b for a, b in zip(r["times_ms"], ref["times_ms"])]
        rows.append([spec.split("@")[0], r["ms"], r["tokens_per_s"], None if r["mfu"] is None else f"{r['mfu']:.1%}",
                     statistics.median(per_round), f"{min(per_round):.2f}-{max(per_round):.2f}",
                     r["flops_per_token"] / ref["flops_per_token"], r["params"] / 1e6, r["active"] / 1e6, r["loss"]])
    notes = [f"{shape(model_settings('stem', vocab, 'step'))}; eager train_step in a child; "
             f"ratio: median of {n_reps(3, 10)} rounds' variant/SwiGLU, range: lowest-highest; target <= 0.9"]
    return result("step", "step: one full training step", ["variant", "ms/step", "tokens/s", "MFU", "ratio to SwiGLU",
                 "ratio range", "FLOP ratio", "params (M)", "active/token (M)", "last loss"], rows, notes, got)

def bench_vocab():
    """The training step as the vocabulary grows: sparse-table STEM, dense-table STEM (plain AdamW), SwiGLU."""
    vocabs, raw = (256, 1024, 4096) if tiny else (8192, 50304, 131072), {}
    for group in ([f"{v}@{n}" for n in vocabs[::-1] for v in ("stem", "swiglu")], [f"stem_dense@{n}" for n in vocabs]):
        got = isolated(time_steps, {spec: model_settings(*spec.split("@"), "vocab") for spec in group})
        raw.update({s: {"error": got["error"]} for s in group} if "error" in got else got)
    ms, first, rows = {k: r.get("ms") for k, r in raw.items()}, vocabs[0], []
    for n in vocabs:
        sw, sp, de = ms[f"swiglu@{n}"], ms[f"stem@{n}"], ms[f"stem_dense@{n}"]
        rows.append([n, sw, sp, de, ratio(sp, sw), ratio(de, sw),
                     ratio(ratio(sp, sw), ratio(ms[f"stem@{first}"], ms[f"swiglu@{first}"])),
                     None if None in (sp, sw) else sp - sw, None if None in (de, sw) else de - sw])
    s = model_settings("stem", "/".join(map(str, vocabs)), "vocab")
    notes = [f"{shape(s)}; median of {n_reps(3, 10)} rounds; stem (sparse table) and swiglu "
             f"alternate in one child process, stem_dense in another; 'vs {first}' divides out the lm_head's growth"]
    return result("vocab", "vocab: training step as the vocabulary grows",
                  ["vocab", "SwiGLU ms", "STEM sparse ms", "STEM dense ms", "sparse/SwiGLU", "dense/SwiGLU",
                   f"sparse/SwiGLU vs {first}", "sparse minus SwiGLU ms", "dense minus SwiGLU ms"], rows,
                  notes + [f"{k}: {r['error']}" for k, r in raw.items() if "error" in r], raw)

def bench_gather():
    """The table's row gather (a batch's distinct rows) against a plain copy of the same bytes."""
    vocab = 1024 if tiny else GPT2_VOCAB
    s = model_settings("stem", vocab, "gather")
    width, B, T = (s["n_layer"] - 1) * s["d_ff"], s["batch_size"], s["block_size"]
    ids = torch.unique(host_batches(1, B, T, vocab)[0][0]).to(device)
    table, dst, out = (torch.full((n, width), 0.01, device=device) for n in (vocab, ids.numel(), ids.numel()))
    fns = {"memcpy (dst.copy_(src))": lambda: dst.copy_(table[:ids.numel()]),
           "index_select into a buffer": lambda: torch.index_select(table, 0, ids, out=out),
           "index_select, new tensor (as lookup())": lambda: table.index_select(0, ids)}
    with torch.no_grad():
        medians, times = time_round_robin(fns, n_reps(30, 100))
    moved, base = 2 * ids.numel() * width * 4, medians["memcpy (dst.copy_(src))"]  # bytes read + written
    return result("gather", "gather: STEM row gather vs memcpy", ["operation", "MB moved", "ms (median)", "GB/s",
                  "fraction of memcpy"], [[k, moved / 1e6, t * 1e3, moved / t / 1e9, base / t] for k, t in
                  medians.items()], [f"{ids.numel()} distinct ids of {B} x {T} {source()}, a {vocab} x "
                  f"{width} fp32 table; median of {n_reps(30, 100)} rounds"], in_ms(times))

def bench_sample():
    """Generation with and without the KV cache."""
    L, C, prompt_len, n_new, vocab = (2, 64, 32, 4, 1024) if tiny else (12, 768, 512, 128, GPT2_VOCAB) \
        if on_gpu() else (6, 384, 512, 32, GPT2_VOCAB)
    with torch.device(device):
        model = GPT(GPTConfig(vocab_size=vocab, block_size=2 * prompt_len, n_layer=L, n_head=C // 64, n_embd=C))
    model.eval().to(getattr(torch, dtype))  # the KV cache takes the weights' dtype
    prompt = host_batches(1, 1, prompt_len, vocab)[0][0].to(device)
    fns = {"KV cache": lambda: model.generate(prompt, n_new, use_cache=True),
           "no cache": lambda: model.generate(prompt, n_new, use_cache=False),
           "prompt only": lambda: model.generate(prompt, 1, use_cache=True)}  # to split prefill from decode
    medians, times = time_round_robin(fns, n_reps(3, 10))
    cached, uncached, prefill = medians["KV cache"], medians["no cache"], medians["prompt only"]
    decode = (cached - prefill) / (n_new - 1)  # per token once the prompt is in the cache; noise can beat tiny runs
    rows = [["no cache", uncached * 1e3, n_new / uncached, uncached * 1e3 / n_new, 1.0],
            ["KV cache", cached * 1e3, n_new / cached, cached * 1e3 / n_new, uncached / cached],
            ["KV cache, decoding only", None] + ([1 / decode, decode * 1e3, uncached / n_new / decode] if decode > 0
                                                 else [None] * 3)]
    return result("sample", "sample: generation speed with and without the KV cache", ["mode", "ms per generate",
                  "new tokens/s", "ms/token", "speedup over no cache"], rows, [f"STEM model, {L} layers, n_embd {C}; "
                  f"a {prompt_len}-token prompt of {source()}, {n_new} new tokens; decoding only = (KV cache - a "
                  "1-token generate) / (new tokens - 1)"], in_ms(times))

def bench_capacity():
    """Parameters active per sequence as the context grows: distinct tokens of real text x the table's rows."""
    dims = dict(vocab_size=1024, n_layer=2, n_head=1, n_embd=64, d_ff=128, block_size=64) if tiny else \
        dict(vocab_size=GPT2_VOCAB, n_layer=12, n_head=12, n_embd=768, d_ff=2048, block_size=1024)
    with torch.device("meta"):
        stem, dense = GPT(GPTConfig(ffn="stem", **dims)), GPT(GPTConfig(ffn="swiglu", **dims))
    c, n_stem, dense_active = stem.config, len(stem.config.stem_layers), dense.active_params_per_token()
    base = stem.active_params_per_token() - stem.stem_table.size(1)  # all a token touches but its own table row
    data, rows = text_tokens(c.vocab_size), []
    for L in (16, 32, 64) if tiny else (128, 256, 512, 1024):
        ordered = data[:len(data) // L * L].view(-1, L).sort(dim=1).values  # non-overlapping windows
        distinct = ((ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1).double()
        mean, active = distinct.mean().item(), base + distinct.mean().item() * n_stem * c.d_ff
        rows.append([L, distinct.numel(), mean, mean / L, round(mean * n_stem), active / 1e6, dense_active / 1e6,
                     active / dense_active, active / stem.num_params()])
    notes = [f"{source()}, {len(data):,} tokens in non-overlapping windows; {c.n_layer} layers, {n_stem} STEM, d_ff "
             f"{c.d_ff}; per sequence: {base / 1e6:.1f}M + distinct tokens x {n_stem} x {c.d_ff}; dense: SwiGLU's"]
    return result("capacity", "capacity: parameters active per sequence vs context length",
                  ["context", "windows", "distinct tokens", "distinct/context", "table rows touched",
                   "STEM active/seq (M)", "dense active/seq (M)", "STEM/dense", "STEM active/total"], rows, notes)

def bench_offload():
    """Bytes the host-resident table moves per train.train_step, measured by OffloadedRowAdamW's counters."""
    n_steps, vocab = (3, 1024) if tiny else (6, GPT2_VOCAB)
    s = {**model_settings("stem", vocab, "offload"), "stem_offload": True}
    run = trainer(s, n_steps, offset=1)
    run.losses = [run.step()[0] for _ in range(n_steps)]
    run.rows_opt.close()  # waits for the last host update
    ids = [torch.unique(x) for x, _ in run.batches + run.batches[:1]]  # micro_batches draws one ahead: batches[0]
    distinct = [i.numel() for i in ids]  # and of those, the ones the previous batch had too (rows its update changed)
    overlap = [int(torch.isin(ids[k], ids[k - 1]).sum()) for k in range(1, len(ids))]
    opt, row_bytes, B, T = run.rows_opt, run.rows_opt.table[0].nbytes, s["batch_size"], s["block_size"]
    m = {"to_device": opt.bytes_to_device / n_steps, "to_host": opt.bytes_to_host / n_steps,
         "expected_to_device": (sum(distinct) + sum(overlap)) * row_bytes / n_steps,
         "expected_to_host": sum(distinct[:-1]) * row_bytes / n_steps}
    return result("offload", "offload: bytes per training step with the STEM table in host memory (measured)",
                  ["model", "batch", "distinct rows/step", "H2D MB/step", "expected H2D MB", "H2D/expected",
                   "D2H MB/step", "expected D2H MB"],
                  [[f"{s['n_layer']} layers, n_embd {s['n_embd']}, vocab {vocab}", f"{B} x {T}",
                    statistics.mean(distinct[:-1]), m["to_device"] / 1e6, m["expected_to_device"] / 1e6,
                    m["to_device"] / m["expected_to_device"], m["to_host"] / 1e6, m["expected_to_host"] / 1e6]],
                  [f"OffloadedRowAdamW's counters over {n_steps} steps on {source()}; expected H2D: each batch's "
                   "distinct rows (the one drawn ahead too) + those the previous update changed after the prefetch"],
                  m)

def train_py(args, launcher=(sys.executable, "train.py"), env=None):
    """train.py (or what launcher names) run to its end: None, or the last line it printed when it failed."""
    proc = subprocess.run([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return (proc.stdout.strip().splitlines() or ["failed"])[-1] if proc.returncode else None

def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [jsonlib.loads(line) for line in f]

def curves(records):  # {iter: loss}, {iter: val_loss}
    return ({r["iter"]: r[k] for r in records if k in r} for k in ("loss", "val_loss"))

def bench_quality():
    """SwiGLU, STEM, STEM on every other layer and MoE, each trained by train.py with quality_config."""
    half = ",".join(map(str, range(1, train.configure([quality_config]).n_layer, 2)))
    variants = {"swiglu": "--ffn=swiglu", "stem": "--ffn=stem", "moe": "--ffn=moe",
                "stem_half": f"--ffn=stem --stem_layers=[{half}]",
                # the table's memory (stem_sparse.py) and the official recipe (train.py's stem_* comments)
                "stem_bf16": "--stem_dtype=bfloat16", "stem_rowwise": "--stem_state=rowwise",
                "stem_bf16_rowwise": "--stem_dtype=bfloat16 --stem_state=rowwise",
                "stem_bf16_nearest": "--stem_dtype=bfloat16 --stem_rounding=nearest",
                "stem_official": "--stem_weight_decay=0.1 --stem_clip=separate"}
    chosen = list(variants) if quality_variants == "all" else quality_variants.split(",")
    if set(chosen) - set(variants):
        raise ConfigError(f"quality_variants: unknown {sorted(set(chosen) - set(variants))}; one of {[*variants]}")
    runs, rows, env = {}, [], dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    for name in chosen:
        args = [quality_config, *variants[name].split(), f"--out_dir={quality_out}/{name}", f"--device={device}",
                f"--dtype={dtype}", *quality_extra.split()]
        log("quality: train.py " + " ".join(args))
        t0, error = time.perf_counter(), train_py(args, env=env)
        if error:
            runs[name] = {"error": error}
            rows.append([name, "failed: " + error] + [None] * 8)
            continue
        losses, val = (list(c.items()) for c in curves(read_log(os.path.join(quality_out, name))))
        with torch.device("meta"):  # the model this run trained, from train.py's own settings
            cfg = train.configure(args)
            model = GPT(GPTConfig(**{k: getattr(cfg, k) for k in train.MODEL_KEYS}))
        jump, at = max(((b - a, it) for (_, a), (it, b) in zip(losses, losses[1:])), default=(0.0, None))
        runs[name] = {"args": args, "wall_s": time.perf_counter() - t0, "train": losses, "val": val}
        rows.append([name, val[-1][1], min(v for _, v in val), losses[-1][1], jump, at, model.num_params() / 1e6,
                     model.active_params_per_token() / 1e6, model.flops_per_token(cfg.block_size) / 1e6,
                     runs[name]["wall_s"]])
    notes = [f"train.py {quality_config} {quality_extra} per variant, out_dir {quality_out}/<variant>; jump: the "
             "largest rise of the train loss between logged steps; wall includes start-up"]
    return result("quality", "quality: small models trained alike on Shakespeare",
                  ["variant", "val loss", "best val", "last train loss", "largest jump", "at step", "params (M)",
                   "active/token (M)", "MFLOPs/token", "wall s"], rows, notes, runs)

def bench_prepare():
    """prepare.py's MB/s of text (read, parse, tokenize, write) against one tiktoken thread on the same text."""
    # Shakespeare's works cut into documents of 4 kB or a little more, at blank lines (web documents run a few kB)
    docs = [doc for path in sorted(prepare.shakespeare_dir().glob("*_gut.txt")) for doc in
            re.findall(r".{3998,}?\n\n|.*\S.*", path.read_text(encoding="utf-8") + "\n\n", flags=re.S)]
    docs, copies = (docs[:250], 1) if tiny else (docs, 8)  # ~1 MB, or the works 8 times over: ~40 MB
    texts, enc, cores, cpu = docs * copies, prepare.load_tokenizer(), len(os.sched_getaffinity(0)), {}
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory(prefix="bench_prepare_", ignore_cleanup_errors=True) as tmp:
        for c in range(copies):
            with open(os.path.join(tmp, f"part{c:02d}.jsonl"), "w", encoding="utf-8") as f:
                f.write("".join(jsonlib.dumps({"text": t}) + "\n" for t in docs))
        def run(workers):
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # its summary would break the table
                prepare.prepare(tmp, name="bench", out_root=os.path.join(tmp, "out"), workers=workers, progress=False)
        fns = {"one tiktoken thread (documents in memory)": lambda: [enc.encode_ordinary(t) for t in texts],
               "prepare.py, workers=1": lambda: run(1), f"prepare.py, workers={cores}": lambda: run(cores)}
        load_before = os.getloadavg()
        medians, times = time_round_robin(fns, n_reps(3), cpu)
        load_after = os.getloadavg()
    one = medians["one tiktoken thread (documents in memory)"]
    rows = [[name, t, mb / t, one / t, statistics.median(cpu[name])] for name, t in medians.items()]
    notes = [f"load average before {', '.join(f'{v:.1f}' for v in load_before)}, after "
             f"{', '.join(f'{v:.1f}' for v in load_after)}; {len(texts):,} ~4 kB documents, {mb:.1f} MB, in {copies} "
             f".jsonl file(s); median of {n_reps(3)} rounds; CPU s: user + system of all processes"]
    return result("prepare", f"prepare: tokenizing throughput, {cores} workers against one tiktoken thread",
                  ["variant", "s (median)", "MB/s of text", "ratio to one thread", "CPU s (median)"], rows, notes,
                  {"seconds": times, "cpu_seconds": cpu})

def shard_traffic(world, micro=40, B=12, T=1024):
    """Bytes the preset's step would exchange on `world` sharded ranks, from its real ids (as stem_shard.py counts):
    rows each micro-batch fetches from their owners, gradients of a step's distinct rows, 8 bytes an id asked."""
    from stem_shard import shard_bounds
    cfg = train.configure([PRESET, *data_args(), "--device=cpu", f"--batch_size={B}", f"--block_size={T}",
                           f"--gradient_accumulation_steps={micro}"])
    row = len(range(1, cfg.n_layer)) * cfg.d_ff * 2  # a bf16 row of every STEM layer, the preset's table
    edges = torch.tensor(shard_bounds(cfg.vocab_size, world))
    starts = train.window_starts(cfg, "train", 0, 0, (micro, B))
    served, grads, k, distinct = np.zeros(world), 0, micro // world, []  # served: rows each owner sends
    for r in range(world):
        mine = [torch.unique(train.get_batch(cfg, "train", starts[r * k + m])[1]) for m in range(k)]
        distinct += [ids.numel() for ids in mine]
        for ids in mine:
            served += torch.searchsorted(ids, edges).diff().numpy() * (np.arange(world) != r)
        per_owner = torch.searchsorted(torch.unique(torch.cat(mine)), edges).diff().numpy()
        grads += per_owner.sum() - per_owner[r]
    return [f"{world} ranks", f"{k} x {B} x {T}", statistics.mean(distinct), served.sum() * row / 1e9,
            served.max() * row / 1e9, grads * row / 1e9, served.sum() * 8 / 1e6]  # a row received: an id sent

def torchrun(ranks):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    return [sys.executable, *launcher]

def bench_shard():
    """FSDP2 + sharded tables against one process: train.py on 1-3 gloo ranks, a run handed 2 -> 3 -> 1 ranks;
    each rank's peak RSS and the checkpoint on disk; then the bytes the preset's step would exchange."""
    steps, logs = 4 if tiny else 20, {}
    tiny_args = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--d_ff=64", "--block_size=32", "--batch_size=4",
                 "--gradient_accumulation_steps=6", f"--eval_interval={steps // 4}", "--eval_iters=2",
                 "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=20", "--vocab_size=50305",
                 "--stem_weight_decay=1.0", "--device=cpu", "--dtype=float32", *data_args()]
    os.makedirs(shard_out, exist_ok=True)
    handed, shard = "handed 2 -> 3 (offloaded) -> 1", "--stem_shard=True"
    for name, ranks, until, *args in (
            ("1 process", 1, steps), ("2 ranks, sharded", 2, steps, shard), ("3 ranks, sharded", 3, steps, shard),
            ("2 ranks, table replicated", 2, steps), (handed, 2, steps // 2, shard),
            (handed, 3, 3 * steps // 4, shard, "--stem_offload=True", "--init_from=resume"),
            (handed, 1, steps, "--init_from=resume")):
        logs[name] = os.path.join(shard_out, name.replace(" ", "_").replace(",", "").replace(">", ""))
        args = [*tiny_args, *args, f"--max_iters={until}", f"--out_dir={logs[name]}"]
        log(f"shard: {' '.join(torchrun(ranks)[1:])} train.py {' '.join(args)}")
        error = train_py(args, [*torchrun(ranks), "train.py"], env={**os.environ, "OMP_NUM_THREADS": "1"})
        if error:
            raise RuntimeError(f"train.py for '{name}' failed: {error}")
    (loss1, eval1), rows = curves(read_log(logs["1 process"])), []
    ref = checkpoint.load(logs["1 process"])["model"]
    for name, out in logs.items():
        (losses, evals), ckpt = curves(read_log(out)), checkpoint.load(out)["model"]
        peaks = [kb / 2**10 for kb in [r for r in read_log(out) if "max_rss_kb" in r][-1]["max_rss_kb"]]
        disk = sum(os.path.getsize(os.path.join(out, "ckpt", f)) for f in os.listdir(os.path.join(out, "ckpt")))
        timed = {k: [r[k] for r in read_log(out) if k in r] for k in ("checkpoint_s", "resume_s")}  # train.py's
        rows.append([name, len(losses), max(abs(losses[i] - loss1[i]) for i in loss1),
                     max(abs(evals[i] - eval1[i]) for i in eval1),
                     max((ckpt[k].double() - ref[k].double()).abs().max().item() for k in ref),
                     " / ".join(f"{p:.0f}" for p in peaks), disk / 2**20, statistics.median(timed["checkpoint_s"]),
                     " / ".join(f"{s:.2f}" for s in timed["resume_s"]) or None])
    timing = ("dt_ms", "tokens_per_s", "checkpoint_s", "resume_s", "max_rss_kb")
    same = [[{k: v for k, v in r.items() if k not in timing} for r in read_log(logs[n])]
            for n in ("2 ranks, sharded", "2 ranks, table replicated")]
    res = result("shard", "shard: train.py with FSDP2 and the STEM table split over processes, against one process",
                 ["run", "steps", "max |loss diff|", "max |val loss diff|", "max |weight diff| at the end",
                  "peak RSS per rank, MB", "checkpoint on disk, MB", "save s (median)", "resume s (each)"], rows,
                 [f"train.py {' '.join(tiny_args)} (gloo, the same global batch of 6 micro-batches); "
                  f"2 ranks with the table sharded and replicated log the same numbers: {same[0] == same[1]}"],
                 {"same_as_replicated": same[0] == same[1]})
    traffic = result("shard_traffic", "shard: bytes the GPT-2-small preset's step exchanges (computed)",
                     ["ranks", "micro-batches a rank", "distinct ids a micro-batch", "rows sent, GB a step",
                      "the busiest owner serves, GB", "gradients sent, GB a step", "ids sent, MB a step"],
                     [shard_traffic(w, micro=8 if tiny else 40, B=2 if tiny else 12) for w in (2, 8)],
                     [f"the preset's step 0 (40 x 12 x 1024 tokens of {data_dir}'s train split); a row: 11 STEM "
                      "layers x 2048 bf16; owners hold contiguous blocks (rank 0 the frequent tokens)"])
    return [res, traffic]

def gpu_parity():
    """model.STEM forward + backward, Triton vs torch and Triton vs itself; reads a strided column block, as GPT."""
    d, f, B, T, vocab = (64, 128, 2, 64, 1024) if tiny else (768, 2048, 8, 1024, GPT2_VOCAB)
    with torch.device(device):
        layer = STEM(GPTConfig(vocab_size=vocab, n_layer=1, n_head=max(1, d // 64), n_embd=d, d_ff=f), 1)
        table, x, grad_y = torch.randn(vocab, 2 * f) * (2 / (vocab + f)) ** 0.5, *torch.randn(2, B, T, d)
    ids, inverse = torch.unique(host_batches(1, B, T, vocab)[0][0].to(device), return_inverse=True)
    def run(fused, amp, table_dtype):
        rows, xx = table[ids].to(table_dtype).requires_grad_(True), x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with autocast(amp):
            y = layer(xx, layer_rows(rows, inverse, ids, f, fused))
        y.backward(grad_y.to(y.dtype))
        sync()
        return {"output": y, "grad x": xx.grad, "grad rows": rows.grad, "grad w_gate": layer.w_gate.weight.grad,
                "grad w_down": layer.w_down.weight.grad}
    rows = []
    for name, amp, table_dtype, tol in (("fp32", False, torch.float32, 1e-4),
                                        ("fp32 table, bf16 autocast", True, torch.float32, 2e-2),
                                        ("bf16 table, bf16 autocast", True, torch.bfloat16, 2e-2)):
        ref, tri, again = (run(fused, amp, table_dtype) for fused in (False, True, True))
        for k in ref:
            err = (tri[k].float() - ref[k].float()).abs().max().item() / max(ref[k].float().abs().max().item(), 1e-30)
            rows.append([name, k, err, tol, err <= tol, torch.equal(tri[k], again[k])])
    return result("gpu_parity", "gpu: Triton vs torch STEM layer, forward and backward",
                  ["precision", "tensor", "relative error", "tolerance", "within", "bit-identical rerun"], rows,
                  [f"d_model {d}, d_ff {f}, {B} x {T} ids of {source()}; error = max |Triton - torch| / "
                   f"max |torch|; rerun: a second Triton run equals the first exactly (no atomics in the backward)"])

def gpu_kernel():
    """The Triton op alone (and torch's forward): bandwidth against a copy timed in the same rounds; the plan apart."""
    f, B, T, vocab, n_stem = (128, 2, 64, 1024, 2) if tiny else (2048, 8, 1024, GPT2_VOCAB, 11)
    inverse = torch.unique(host_batches(1, B, T, vocab)[0][0].to(device), return_inverse=True)[1].flatten()
    R, copy = int(inverse.max()) + 1, "copy (device to device)"
    plan, big = stem_ops.backward_plan(inverse, R), torch.empty(2 ** (22 if tiny else 28), device=device)  # 1 GiB
    copy_to, out, raw = torch.empty_like(big), [], {}
    for rows_dtype, gdt in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                            (torch.float32, torch.float32)):
        rows = torch.randn(R, n_stem * f, device=device, dtype=rows_dtype)[:, :f]  # one layer's column block
        gate, grad_h = torch.randn(2, B * T, f, device=device, dtype=gdt)
        fns = {copy: lambda: copy_to.copy_(big),
               "triton forward": lambda: stem_ops.silu_mul_rows(gate, rows, inverse, plan),
               "triton backward": lambda: stem_ops.silu_mul_rows_backward(grad_h, gate, rows, inverse, plan),
               "backward plan (once per forward)": lambda: stem_ops.backward_plan(inverse, R),
               "torch forward": lambda: F.silu(gate) * F.embedding(inverse, rows).to(gdt)}
        g, r = gate.numel() * gate.element_size(), R * f * rows.element_size()  # all positions, each row once
        moved = {copy: 2 * big.numel() * 4, "triton forward": 2 * g + r, "triton backward": 3 * g + 2 * r,
                 "torch forward": 2 * g + r}
        with torch.no_grad():
            medians = time_round_robin(fns, n_reps(5))[0]
        copy_bw, case = moved[copy] / medians[copy], f"{str(rows_dtype)[6:]} rows, {str(gdt)[6:]} gate"
        out += [[case, k, t * 1e3] + ([moved[k] / 1e6, moved[k] / t / 1e9, moved[k] / t / copy_bw] if k in moved else
                                      [None] * 3) for k, t in medians.items()]
        raw[case] = {"copy_GB_s": copy_bw / 1e9, "ms": {k: v * 1e3 for k, v in medians.items()}}
    notes = [f"gate [{B * T}, {f}], {R} distinct rows of {source()} (a block of [{R}, {n_stem * f}]); "
             f"median of {n_reps(5)} rounds; bytes: gate (+ grads) and each distinct row (+ its gradient) once"]
    return result("gpu_kernel", "gpu: silu_mul_rows time and effective bandwidth", ["case", "operation", "ms",
                  "MB moved", "GB/s", "fraction of copy"], out, notes, raw)

def gpu_train(deadline):
    """Compiled GPT-2-small steps, one variant at a time (its peak memory its own), none started past the deadline;
    each STEM variant's losses against the Triton run's (same weights and batches)."""
    preset = train.configure([PRESET])
    table = {k: getattr(preset, k) for k in ("stem_dtype", "stem_state", "stem_weight_decay", "stem_clip")}
    common = {**model_settings("stem", 1024 if tiny else GPT2_VOCAB, "step"), "compile": on_gpu(), "dtype": "bfloat16"}
    info = {}
    for name, extra in (("stem, triton", {**table, "stem_kernel": "triton" if on_gpu() else "torch"}),
                        ("stem, torch path", {**table, "stem_kernel": "torch"}), ("swiglu", {"ffn": "swiglu"}),
                        ("stem offloaded", {**table, "stem_offload": True}),
                        # last: its one-process group (FSDP2 needs one) stays for the rest of this process
                        ("stem, dense offload", {**table, "dense_offload": True})):
        if time.perf_counter() > deadline:
            info[name] = {"error": f"skipped: past the {gpu_budget_s:g} s budget (gpu_budget_s)"}
            continue
        log(f"gpu: {name}")
        free_memory()  # each variant's peak memory its own
        try:
            r = time_steps({name: {**common, **extra}}, warm=max(0, 3 - warmup))[name]
            info[name] = {**r, "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu() else None}
        except Exception as e:  # recorded, and the next variant runs
            log(f"gpu: {name} failed:\n{traceback.format_exc()}")
            info[name] = {"error": one_line(e)}
    free_memory()
    ref, rows = info["stem, triton"].get("losses"), []
    for name, r in info.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"]] + [None] * 8)
            continue
        diff = [abs(x - y) for x, y in zip(ref, r["losses"])] if ref and name.startswith("stem") else None
        rows.append([name, r["ms"], r["tokens_per_s"], None if r["mfu"] is None else f"{r['mfu']:.1%}", r["peak_gb"],
                     ratio(r["ms"], info["swiglu"].get("ms")), r["flops_per_token"] / 1e9, r["losses"][-1],
                     max(diff) if diff else None, f"{diff.count(0)} of {len(diff)}" if diff else None])
    return result("gpu_train", "gpu: GPT-2-small training step, compiled", ["variant", "ms/step", "tokens/s", "MFU",
                  "peak GB", "ratio to SwiGLU", "GFLOP/token", "last loss", "max loss diff to stem, triton",
                  "identical losses"], rows,
                  [f"{shape(common)}; torch.compile; STEM tables as the preset: {table}; median of {n_reps(3, 10)} "
                   f"steps after {max(warmup, 3)} warm-up; peak GB: the variant's own; loss diffs: same weights and "
                   "batches as stem, triton; torch path: F.silu(gate) * F.embedding(t, E) compiled by Inductor; "
                   "offloaded: the row AdamW on the host; dense offload: FSDP2's CPUOffloadPolicy, AdamW on the host"],
                  info)

def bench_gpu():
    """The GPU check: each part's results yielded (printed, saved) as it ends; none starts past gpu_budget_s."""
    deadline = time.perf_counter() + gpu_budget_s
    for name, part in (("parity", gpu_parity), ("kernel", gpu_kernel), ("train", lambda: gpu_train(deadline))):
        if time.perf_counter() > deadline:
            yield result(f"gpu_{name}", f"gpu: {name}: skipped", ["error"], [[f"past the {gpu_budget_s:g} s budget"]])
            continue
        t0 = time.perf_counter()
        try:
            out = part()
        except Exception as e:
            log(f"gpu {name} failed:\n{traceback.format_exc()}")
            out = result(f"gpu_{name}", f"gpu: {name}: failed", ["error"], [[one_line(e)]])
        for res in out if isinstance(out, list) else [out]:
            yield {**res, "seconds": time.perf_counter() - t0}

BENCHES = {"ffn": bench_ffn, "step": bench_step, "vocab": bench_vocab, "gather": bench_gather,
           "sample": bench_sample, "capacity": bench_capacity, "offload": bench_offload, "prepare": bench_prepare,
           "shard": bench_shard, "quality": bench_quality, "gpu": bench_gpu}

def parse_settings(argv):
    settings, _ = configurator.parse(argv, DEFAULTS, {}, __file__, __doc__)
    if settings["what"] not in ("all", *BENCHES):
        raise ConfigError(f"what must be all or one of {', '.join(BENCHES)}, got {settings['what']!r}")
    if settings["what"] == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("--what=gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
        out = os.path.join(os.environ.get("OUT", ""), "bench_gpu.json")
        settings.update(device="cuda", dtype="bfloat16", json=settings["json"] or out)
    return settings

def apply(settings):  # the settings as this module's globals, then the thread count and the seed
    globals().update(settings)
    torch.set_num_threads(threads or torch.get_num_threads())
    torch.manual_seed(seed)

def save_json(results):
    """All results so far, to the json file, atomically: a run cut short (a time limit) keeps what it finished."""
    versions = {"torch": torch.__version__, "triton": getattr(stem_ops.triton, "__version__", None)}
    with open(json + ".tmp", "w") as f:
        jsonlib.dump({"settings": {k: globals()[k] for k in DEFAULTS}, "machine": machine(), "versions": versions,
                      **results}, f, indent=1, default=str)
    os.replace(json + ".tmp", json)

def main(argv):
    apply(parse_settings(argv))
    results, t_start = {}, time.perf_counter()
    for name in [w for w in BENCHES if w not in ("shard", "quality", "gpu")] if what == "all" else [what]:
        t0, out = time.perf_counter(), BENCHES[name]()
        for res in out if isinstance(out, (list, GeneratorType)) else [out]:  # gpu yields part by part
            results[res["name"]] = {**res, "seconds": res.get("seconds", time.perf_counter() - t0)}
            print_result(res)
            if json:
                save_json(results)
    print(f"\n{time.perf_counter() - t_start:.0f} s in all (python bench.py {' '.join(argv)})".replace(" )", ")"))
    return results

if __name__ == "__main__":
    configurator.run_main(lambda: main(sys.argv[1:]), "bench.py")
