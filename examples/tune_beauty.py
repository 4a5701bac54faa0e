"""Resumable tuning grid on Amazon Beauty, judged on the *validation* split only.

Each variant is one ``h2rec train`` (its own run folder under ``--runs``), followed by
``h2rec evaluate --split valid`` whose JSON (overall, head/tail, popularity buckets) is written to
``--results/<name>.json``. A variant whose result file exists is skipped, so the script can be
stopped and restarted at will, and several copies can share the list (``--worker i/n`` takes every
n-th variant). Test metrics are never read here: choose on validation, then test once.

    python examples/tune_beauty.py DATA_DIR --runs runs/tune --results examples/results/beauty-valid \
        --worker 0/2 &
    python examples/tune_beauty.py DATA_DIR --runs runs/tune --results examples/results/beauty-valid \
        --worker 1/2 &

``DATA_DIR`` is a prepared Beauty folder with ``embeddings.npy`` and ``sid/`` (see
examples/README.md). Every run uses one thread (two workers share two cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# the text blend (train.text_blend) is chosen on the validation split itself: left out here, so
# that every variant is judged on the trained model alone
COMMON = ["train.num_threads=1", "train.patience=5", "train.epochs=40", "train.text_blend=off"]
# the runs before train.lr_decay_patience=2 became the default had a constant learning rate
CONST = ["train.lr_decay_patience=0"]

# the H2Rec runs before item_score=fused and align_seq_target=branch became the defaults
PAPER_SCORE = ["model.item_score=paired", "model.align_seq_target=sid"]
FUSED = ["model.kind=h2rec", "model.item_score=fused", "model.align_seq_target=branch",
         "train.loss_scale=epoch"]

# today's SASRec default as sasrec-lrdecay2 ran it
SASREC = ["model.kind=sasrec", "train.loss_scale=epoch", "train.lr_decay_patience=2"]

VARIANTS: dict[str, list[str]] = {
    # the first runs used the per-batch mean of the loss (the default then)
    "sasrec": [*CONST, "model.kind=sasrec", "train.loss_scale=batch"],
    "h2rec": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "train.loss_scale=batch"],
    "fusion": [*CONST, "model.kind=fusion", "train.loss_scale=batch"],
    "h2rec-popgate": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.hid_pop_gate=true", "train.loss_scale=batch"],
    "h2rec-seqhid": [*CONST, "model.kind=h2rec", "model.item_score=paired", "model.align_seq_target=hid", "train.loss_scale=batch"],
    "sasrec-nobucket": [*CONST, "model.kind=sasrec", "train.length_buckets=0", "train.loss_scale=batch"],
    "h2rec-pca": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.hid_init=pca", "train.loss_scale=batch"],
    "sid": [*CONST, "model.kind=sid", "train.loss_scale=batch"],
    "h2rec-align03": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.align_item_weight=0.3", "model.align_seq_weight=0.3", "train.loss_scale=batch"],
    "h2rec-noalign": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.align_item=false", "model.align_seq=false", "train.loss_scale=batch"],
    "h2rec-nobucket": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "train.length_buckets=0", "train.loss_scale=batch"],
    "fusion-nobucket": [*CONST, "model.kind=fusion", "train.length_buckets=0", "train.loss_scale=batch"],
    # length buckets with every position weighing the same (train.loss_scale=epoch, the default
    # since these runs; the runs above used the per-batch mean)
    "sasrec-epochscale": [*CONST, "model.kind=sasrec", "train.loss_scale=epoch"],
    "fusion-epochscale": [*CONST, "model.kind=fusion", "train.loss_scale=epoch"],
    "h2rec-epochscale": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "train.loss_scale=epoch"],
    # rare items' hash-ID vectors are mostly noise: start them from the text (PCA of the item
    # embeddings), or let the score weigh them by the item's training popularity
    "h2rec-pca-es": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.hid_init=pca", "train.loss_scale=epoch"],
    "h2rec-popgate-es": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.hid_pop_gate=true", "train.loss_scale=epoch"],
    # the masked SID view pulled to the SID branch's own state (no second backbone pass)
    "h2rec-pca-seqbranch-es": [*CONST, "model.kind=h2rec", "model.item_score=paired", "model.hid_init=pca",
                               "model.align_seq_target=branch", "train.loss_scale=epoch"],
    # is a gain from PCA-initialised HIDs the method's, or the init's? the same init elsewhere
    "fusion-pca-es": [*CONST, "model.kind=fusion", "model.hid_init=pca", "train.loss_scale=epoch"],
    "sasrec-pca-es": [*CONST, "model.kind=sasrec", "model.hid_init=pca", "train.loss_scale=epoch"],
    "h2rec-seqbranch-es": [*CONST, "model.kind=h2rec", "model.item_score=paired", "model.align_seq_target=branch",
                           "train.loss_scale=epoch"],
    # the paper's ablation "without either alignment loss"
    "h2rec-noalign-es": [*CONST, "model.kind=h2rec", *PAPER_SCORE, "model.align_item=false", "model.align_seq=false",
                         "train.loss_scale=epoch"],
    # both branches scored against the item's HID + SID vector (model.item_score=fused), with the
    # paper's sequence-level target and with the branch's own (together the defaults since then)
    "h2rec-fused-es": [*CONST, "model.kind=h2rec", "model.item_score=fused", "model.align_seq_target=sid",
                       "train.loss_scale=epoch"],
    "h2rec-fused-seqbranch-es": [*CONST, *FUSED, "train.loss_scale=epoch"],
    # the paper's ablations, of the default (the learning-rate decay included)
    "h2rec-fused-noitem": [*FUSED, "model.align_item=false"],
    "h2rec-fused-noseq": [*FUSED, "model.align_seq=false"],
    "h2rec-fused-noalign": [*FUSED, "model.align_item=false", "model.align_seq=false"],
    "h2rec-fused-nosidbranch": [*FUSED, "model.branches=hid"],
    "h2rec-fused-nohidbranch": [*FUSED, "model.branches=sid"],
    "h2rec-fused-nogate": [*FUSED, "model.gate=false"],
    "h2rec-fused-window1": [*FUSED, "model.align_item_window=1"],
    "h2rec-fused-window5": [*FUSED, "model.align_item_window=5"],
    # the validation curve plateaus noisily from epoch 9 on: halve the rate after 2 flat epochs
    "h2rec-fused-lrdecay2": [*FUSED, "train.lr_decay_patience=2"],
    # the same schedule for the baselines: a default applies to every model
    "sasrec-lrdecay2": ["model.kind=sasrec", "train.loss_scale=epoch", "train.lr_decay_patience=2"],
    "fusion-lrdecay2": ["model.kind=fusion", "train.loss_scale=epoch", "train.lr_decay_patience=2"],
    # logit adjustment: tau * log(1 + popularity) added to the logits while training only
    "h2rec-fused-la03": [*FUSED, "train.lr_decay_patience=2", "train.logit_adjust=0.3"],
    "sasrec-la03": ["model.kind=sasrec", "train.loss_scale=epoch", "train.lr_decay_patience=2",
                    "train.logit_adjust=0.3"],
    # text match: w_t <q_t, e_i>, the decayed text profile of the history against each item's
    # text embedding, as extra score columns (h2rec.models.text_match)
    "h2rec-fused-text": [*FUSED, "train.lr_decay_patience=2", "model.text_match=true"],
    "fusion-text": ["model.kind=fusion", "train.loss_scale=epoch", "train.lr_decay_patience=2",
                    "model.text_match=true"],
    "sasrec-text": ["model.kind=sasrec", "train.loss_scale=epoch", "train.lr_decay_patience=2",
                    "model.text_match=true"],
    # deep supervision: each branch's state also trained alone against the fused item vectors
    # (model.branch_loss), against the sum's drag on popular items seen on MovieLens-1M
    "h2rec-fused-branch05": [*FUSED, "train.lr_decay_patience=2", "model.branch_loss=0.5"],
    # SASRec tuned one setting at a time around today's defaults (sasrec-lrdecay2 is the
    # default itself, its settings pinned here too): width, dropout, depth, heads, learning
    # rate, weight decay
    "sasrec-h128": [*SASREC, "model.hidden=128"],
    "sasrec-d03": [*SASREC, "model.dropout=0.3"],
    "sasrec-l3": [*SASREC, "model.n_layers=3"],
    "sasrec-lr2e3": [*SASREC, "train.lr=0.002"],
    "sasrec-wd": [*SASREC, "train.optimizer=adamw", "train.weight_decay=0.01"],
    "sasrec-heads2": [*SASREC, "model.n_heads=2"],
    # width 128 won on MovieLens-1M for every model, and is SASRec's best single change here:
    # the other models at 128, and SASRec's two best changes together
    "sasrec-h128-l3": [*SASREC, "model.hidden=128", "model.n_layers=3"],
    "h2rec-fused-h128": [*FUSED, "train.lr_decay_patience=2", "model.hidden=128"],
    "fusion-h128": ["model.kind=fusion", "train.loss_scale=epoch", "train.lr_decay_patience=2",
                    "model.hidden=128"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--runs", default="runs/tune")
    p.add_argument("--results", default="examples/results/beauty-valid")
    p.add_argument("--worker", default="0/1", help="i/n: run every n-th variant starting at i")
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="print the table of finished variants")
    p.add_argument("--plot", default="", help="with --summary: write a per-bucket PNG here")
    p.add_argument("--plot-variants",
                   default="sasrec-epochscale,fusion-epochscale,h2rec-epochscale,h2rec-fused-seqbranch-es",
                   help="variants in the plot; the first is the reference of the ratio panel")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(Path(args.results)))
        if args.plot:
            plot(Path(args.results), args.plot_variants.split(","), Path(args.plot))
        return 0
    i, n = (int(v) for v in args.worker.split("/"))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    names = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    for k, name in enumerate(names):
        if k % n != i:
            continue
        tag = name if args.seed == 0 else f"{name}-s{args.seed}"
        out = results / f"{tag}.json"
        if out.exists():
            print(f"[{tag}] done, skipped", flush=True)
            continue
        sets = [*COMMON, *VARIANTS[name], f"train.seed={args.seed}"]
        cmd = [sys.executable, "-m", "h2rec.cli", "train", args.data, "--sids", f"{args.data}/sid",
               "--name", tag, "--output-dir", args.runs]
        run_dir = Path(args.runs) / tag
        if (run_dir / "last.pt").exists() and not (run_dir / "metrics.json").exists():
            cmd.append("--resume")
        for s in sets:
            cmd += ["--set", s]
        t0 = time.time()
        print(f"[{tag}] training: {' '.join(sets)}", flush=True)
        if not (run_dir / "metrics.json").exists():
            subprocess.run(cmd, check=True)
        ev = [sys.executable, "-m", "h2rec.cli", "evaluate", str(run_dir), "--split", "valid",
              "--out", str(out.with_suffix(".tmp.json")), "--overwrite"]
        subprocess.run(ev, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.with_suffix(".tmp.json").read_text())
        hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        res["variant"] = {"name": name, "seed": args.seed, "set": sets}
        res["epochs"] = len(hist)
        res["valid_curve"] = [round(h.get("valid", {}).get("NDCG@10", float("nan")), 4) for h in hist]
        res["epoch_seconds"] = [round(h.get("epoch_seconds", float("nan")), 1) for h in hist]
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".tmp.json").unlink()
        print(f"[{tag}] {time.time() - t0:.0f} s, {len(hist)} epochs", flush=True)
    return 0


def summary(results: Path) -> str:
    """Markdown table of every finished variant: validation NDCG@10 overall, head, tail, buckets."""
    rows = []
    buckets: list[str] = []
    for f in sorted(results.glob("*.json")):
        if f.name.endswith(".tmp.json"):
            continue
        r = json.loads(f.read_text())
        (res,) = r["models"].values()
        buckets = [b for b in r["buckets"]]
        g = res["groups"]
        cells = [res["metrics"]["NDCG@10"], res["metrics"]["HR@10"], g["head"]["NDCG@10"],
                 g["tail"]["NDCG@10"], *[g.get(f"pop_{b}", {}).get("NDCG@10") for b in buckets]]
        sets = r.get("variant", {}).get("set", [])
        bucketed = "train.length_buckets=0" not in sets
        scale = "epoch" if "train.loss_scale=epoch" in sets else "batch"  # batch: before the fix
        batching = f"{'bucketed' if bucketed else 'random'}, loss_scale={scale}"
        rows.append(f"| {f.stem} | {batching} | {r['epochs']} | " + " | ".join(
            "-" if c is None else f"{c:.4f}" for c in cells) + " |")
    head = ("| variant | batches | epochs | NDCG@10 | HR@10 | head | tail | "
            + " | ".join(buckets) + " |")
    return "\n".join([head, "|---" * (7 + len(buckets)) + "|", *rows])


def plot(results: Path, names: list[str], out: Path) -> None:
    """Validation NDCG@10 by target popularity bucket: the values, and each variant's ratio to
    the first one (where the differences between models are visible)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from h2rec.report import atomic_writer

    runs = {}
    for name in names:
        (res,) = json.loads((results / f"{name}.json").read_text())["models"].values()
        runs[name] = res["groups"]
    first = runs[names[0]]
    labels = [k[4:] for k in first if k.startswith("pop_")]
    fig = Figure(figsize=(11, 4))
    ax_abs, ax_rel = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / len(names)
    for i, (name, groups) in enumerate(runs.items()):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
        vals = [groups[f"pop_{b}"]["NDCG@10"] for b in labels]
        ref = [first[f"pop_{b}"]["NDCG@10"] for b in labels]
        ax_abs.bar(xs, vals, width=width, label=name)
        ax_rel.bar(xs, [v / r for v, r in zip(vals, ref)], width=width, label=name)
    ticks = [f"{b}\n(n={first[f'pop_{b}']['n']})" for b in labels]
    for ax, title in ((ax_abs, "validation NDCG@10"), (ax_rel, f"NDCG@10 / {names[0]}'s")):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(ticks)
        ax.set_xlabel("target's training popularity")
        ax.set_title(title)
    ax_rel.axhline(1.0, color="black", linewidth=0.8)
    ax_rel.set_ylim(0.7, 1.3)
    ax_abs.legend(fontsize=8)
    fig.tight_layout()
    atomic_writer(out, lambda f: fig.savefig(f, format="png", dpi=110))


if __name__ == "__main__":
    raise SystemExit(main())
