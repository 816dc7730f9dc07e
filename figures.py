"""
The figures in docs/, drawn from the runs' own files (matplotlib, optional: pip install matplotlib):

    python figures.py          # docs/quality_curves.png and docs/loss_by_position.png

quality_curves.png: validation loss by step of the quality runs of SwiGLU, STEM and MoE, one run a seed, from their
log.jsonl; loss_by_position.png: eval.py's loss by position in the window, and below it the STEM table parameters
a sequence has read so far, from the first seed's eval.json. A missing input stops it with one line naming the
command that makes it. Settings: the block below (--help).
"""

import json
import os
import sys
from types import SimpleNamespace

from configurator import ConfigError, defaults_of, parse, run_main

# ----------------------------------------------------------------------------------------------------------
# settings (--key=value)
quality_out = "out/quality"  # the runs are in <quality_out>_s<seed>/<ffn>/, one folder a seed (bench.py --what=quality)
seeds = "1337,1338"  # the seeds of the quality runs, comma separated; the first one's eval.json files are drawn too
out_dir = "docs"  # where the PNGs go
# ----------------------------------------------------------------------------------------------------------
SETTINGS = defaults_of(globals())
FFNS = ("swiglu", "stem", "moe")
TRAIN = ("python bench.py --what=quality --quality_variants=swiglu,stem,moe --quality_out={out}_s{seed} "
         "--quality_extra=\"--seed={seed}\"")
EVAL = "python eval.py --out_dir={} --parts=position --max_tokens=0"


def val_curve(run):
    """{step: validation loss} of train.py's log.jsonl in run."""
    path = os.path.join(run, "log.jsonl")
    if not os.path.exists(path):
        return None
    records = [json.loads(line) for line in open(path)]
    return {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}


def save(fig, cfg, name):  # a temp name, then rename: a failed draw leaves the PNG that was there
    for ax in fig.axes:
        ax.legend()
        ax.grid(alpha=0.3)
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, name)
    fig.savefig(path + ".tmp", format="png", dpi=110, bbox_inches="tight")
    os.replace(path + ".tmp", path)
    return path


def draw(cfg):
    """Both figures; returns the numbers drawn as (ffn, seed, where, loss, STEM params read) rows."""
    try:  # optional: nothing else in the repo imports it
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("figures.py draws with matplotlib, which is not installed: pip install matplotlib") from None
    plt.switch_backend("agg")  # files only, no window
    seeds, rows = cfg.seeds.split(","), []
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for seed, style in zip(seeds, ("-", "--", ":", "-.")):
        for ffn, color in zip(FFNS, ("C0", "C1", "C2")):
            val = val_curve(f"{cfg.quality_out}_s{seed}/{ffn}")
            if val is None:
                raise ConfigError(f"no {cfg.quality_out}_s{seed}/{ffn}/log.jsonl: make it with "
                                  f"`{TRAIN.format(out=cfg.quality_out, seed=seed)}`")
            ax.plot(list(val), list(val.values()), style, color=color, marker="o", label=f"{ffn}, seed {seed}")
            rows.append([ffn, seed, f"step {max(val)}", val[max(val)], None])
    ax.set(xlabel="training step", ylabel="validation loss, nats/token (axis cut at 8)",
           ylim=(None, min(ax.get_ylim()[1], 8)))
    ax.set_title("Validation loss, config/quality_shakespeare.py on Shakespeare, trained by\n"
                 + TRAIN.format(out=cfg.quality_out, seed="S"), fontsize=9)
    paths = [save(fig, cfg, "quality_curves.png")]
    fig, (ax, below) = plt.subplots(2, 1, sharex=True, figsize=(9, 7), height_ratios=(2, 1))
    for ffn, color in zip(FFNS, ("C0", "C1", "C2")):
        run = f"{cfg.quality_out}_s{seeds[0]}/{ffn}"
        res = json.load(open(f"{run}/eval.json")) if os.path.exists(f"{run}/eval.json") else {}
        if "position" not in res:
            raise ConfigError(f"no loss by position in {run}/eval.json: make it with `{EVAL.format(run)}`")
        pos, at = res["position"], [(p["start"] + p["end"]) / 2 for p in res["position"]]
        ax.plot(at, [p["loss"] for p in pos], color=color, marker="o", label=ffn)
        if ffn == "stem":  # the rows of the distinct tokens so far: what a sequence has read of the table
            below.plot(at, [p["stem_params"] for p in pos], color=color, marker="o", label=ffn)
        rows += [[ffn, seeds[0], f"positions {p['start']}-{p['end']}", p["loss"], p["stem_params"]]
                 for p in (pos[0], pos[-1])]
    ax.set(ylabel="validation loss (nats/token)")
    ax.set_title(f"Loss by position in the window, {res['data']} val split ({res['val_tokens']:,} tokens), seed "
                 f"{seeds[0]}'s runs, from\n{EVAL.format(f'{cfg.quality_out}_s{seeds[0]}/<ffn>')}", fontsize=9)
    below.set(xlabel="position in the window (middle of each bucket)", ylabel="STEM table params read so far")
    below.yaxis.set_major_formatter("{x:,.0f}")
    paths.append(save(fig, cfg, "loss_by_position.png"))
    plt.close("all")
    return rows, paths


def main(argv):
    settings, _ = parse(argv, SETTINGS, {}, __file__, __doc__)
    cfg = SimpleNamespace(**settings)
    rows, paths = draw(cfg)
    for row in rows:
        print(" ".join(str(v) for v in row))
    print(f"wrote {', '.join(paths)}")
    return rows


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]), "figures.py")
