"""The results table: SASRec, SID-only, naive fusion and H2Rec on Beauty, Yelp and MovieLens-1M,
several seeds each, on the *test* split, with default settings (plus any ``--set``).

Each (dataset, model, seed) is one ``h2rec train`` in its own run folder, then two
``h2rec evaluate --split test`` (full ranking with history excluded, and the paper's sampled
protocol, 100 negatives); both JSONs and the run's training curve go to
``--results/<dataset>/<model>-s<seed>.json``, with the run's resolved settings. A run whose
result file holds the settings the command would use today is skipped; one made with other
settings (a default changed since) is run again, its old run folder kept aside as
``<tag>.stale-<k>``, and the summary leaves such results out until then. An interrupted
training resumes from its ``last.pt``, so the table fills up across sittings;
copies of the script can share the work (``--worker i/n`` takes every n-th run). Datasets are
prepared from ``--shared`` (the research-licensed files, never copied into the repository) on
first use, with TF-IDF embeddings and the default 3 x 256 Semantic IDs.

    python examples/results_table.py --shared ../shared/data --work runs/results \\
        --results examples/results/test --worker 0/2 &
    python examples/results_table.py --shared ../shared/data --work runs/results \\
        --results examples/results/test --worker 1/2 &
    python examples/results_table.py --results examples/results/test --summary \\
        --plot examples/results/test/buckets.png

The summary gives mean +- std over the seeds found (n = how many), overall, head and tail items,
the popularity buckets, short and long users, the sampled protocol, and the Semantic IDs'
collision share and codebook usage; ``--plot`` draws the popularity buckets of every dataset
(mean and std over seeds, and the ratio to SASRec). Tune on validation (examples/tune_beauty.py),
never here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# prepare arguments per dataset, as in examples/README.md (file names under --shared/<folder>)
DATASETS: dict[str, dict[str, object]] = {
    "beauty": {
        "folder": "beauty",
        "prepare": ["user_sequence.txt", "--items", "products_lookup.csv"],
        # SASRec tuned one setting at a time around the defaults on validation
        # (examples/results/beauty-valid, sasrec-*): width 128 was its best change (NDCG@10
        # 0.0719 against 0.0703; 3 layers 0.0718, dropout 0.3 0.0708, lr 2e-3 0.0707, AdamW
        # 0.0703, 2 heads 0.0701; width 128 and 3 layers together 0.0723). Naive fusion also
        # gained at 128 (0.0750, against 0.0724 at 64 with a constant rate). H2Rec stays at 64:
        # at 128 it fell to 0.0725 from 0.0757.
        "model_sets": {"sasrec": ["model.hidden=128"], "fusion": ["model.hidden=128"]},
    },
    "yelp": {
        "folder": "yelp",
        "prepare": ["Yelp.txt", "--items", "Yelp.item.json", "--item-id-offset", "1",
                    "--template", "{title}. Categories: {description}"],
    },
    "ml-1m": {
        "folder": "ml-1m",
        "prepare": ["ml-1m.txt", "--items", "movies.dat", "--item-id-map",
                    "sas_to_original_items.txt", "--template", "{title}. Genres: {genres}"],
        # SASRec's protocol for MovieLens-1M: its histories average 165 items, and the default
        # 50 would train on under a third of them. Dropout 0.2 (SASRec's for this dense set)
        # with the rate halved after 4 flat validations and a patience of 10: on validation
        # SASRec reached NDCG@10 0.1487 by epoch 17 against 0.1344 at best with the defaults
        # (dropout 0.5), H2Rec 0.1468 by epoch 16 against 0.1357 (examples/results/ml-1m-valid).
        # Hidden 128: at 64 both were under-fit on these 1M interactions; at 128 SASRec passed its
        # best of 64 (0.1787) by epoch 21 and H2Rec its (0.1827) by epoch 23 (sasrec-h128,
        # h2rec-noalign-h128)
        # Every window of the long histories (a third of the training interactions are never a
        # target at length 200 otherwise) and a moving average of the weights: on validation
        # SASRec's best rose from 0.1961 to 0.2025, H2Rec's from 0.1940 to 0.2027
        # (examples/results/ml-1m-valid: sasrec-h128, h2rec-noalign-h128 against the table's
        # seed-0 runs of this recipe)
        "sets": ["model.max_len=200", "model.dropout=0.2", "model.hidden=128",
                 "train.lr_decay_patience=4", "train.epochs=150", "train.patience=10",
                 "train.ema=0.995", "train.windows=true"],
        # H2Rec without its alignment losses on this dense set: on validation they held it at
        # 0.1500 (best, epoch 27), against 0.1620 by epoch 20 without them and SASRec's 0.1522
        # at that epoch (examples/results/ml-1m-valid: h2rec-d02, h2rec-noalign, sasrec-d02)
        "model_sets": {"h2rec": ["model.align_item=false", "model.align_seq=false"]},
    },
}
# Amazon sets without item titles (S3Rec's processing): each item's text is its category and
# brand ids (h2rec prepare reads *_item2attributes.json as the words attr<id>). Beauty's settings;
# not in the default --datasets (the table is Beauty, Yelp and MovieLens-1M)
for _name, _file in (("toys", "Toys_and_Games"), ("sports", "Sports_and_Outdoors")):
    DATASETS[_name] = {
        "folder": _name,
        "prepare": [f"{_file}.txt", "--items", f"{_file}_item2attributes.json"],
        "model_sets": DATASETS["beauty"]["model_sets"],
    }
DEFAULT_DATASETS = ("beauty", "yelp", "ml-1m")
MODELS = ("sasrec", "sid", "fusion", "h2rec")
COMMON = ["train.patience=5", "train.epochs=60"]


def _h2rec(*args: str, quiet: bool = False) -> None:
    cmd = [sys.executable, "-m", "h2rec.cli", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)


def prepared(name: str, shared: Path, work: Path) -> Path:
    """The prepared dataset folder (with embeddings.npy and sid/), made on first use; workers
    that start together take turns (a lock file), so one prepares and the others reuse it."""
    import fcntl

    spec = DATASETS[name]
    data = work / "data" / name
    data.parent.mkdir(parents=True, exist_ok=True)
    # not ".<name>.lock": that is the lock h2rec itself holds beside a folder it writes
    with open(work / "data" / f".{name}.prepare-turn", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(spec, data, shared / str(spec["folder"]))


def _prepare_locked(spec: dict[str, object], data: Path, src: Path) -> Path:
    if not (data / "meta.json").exists():
        args = list(spec["prepare"])  # type: ignore[arg-type]
        inputs = {"--items", "--item-id-map"}
        resolved = [str(src / args[0])]
        for i, a in enumerate(args[1:], start=1):
            resolved.append(str(src / a) if args[i - 1] in inputs else a)
        _h2rec("prepare", resolved[0], str(data), *resolved[1:], "--overwrite")
    if not (data / "embeddings.npy").exists():
        _h2rec("embed", str(data), "--backend", "tfidf")
    if not (data / "sid" / "codes.npy").exists():
        _h2rec("build-sid", str(data), str(data / "sid"))
    return data


# what does not change a run's results: left out when a result's settings are compared
# what does not change what a run learns: the thread count, the device, the full softmax's
# chunk memory (it changes only the rounding) and the text blend, which is chosen after training
# (``h2rec blend``; a result records it, see needs_blend)
_NOT_COMPARED = (
    "train.num_threads", "train.device", "train.text_blend", "train.loss_memory_mb",
)


def _flat(values: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_of(config: dict) -> dict[str, object]:
    """The model and training settings of a resolved config (as saved in a run's config.json),
    read as this h2rec reads saved runs (settings added since take the value the run had)."""
    from h2rec.config import config_from_saved, config_to_dict
    from h2rec.errors import ConfigError

    try:
        resolved = config_to_dict(config_from_saved(config))
    except ConfigError as err:  # a setting this h2rec no longer has: not today's run
        return {"unreadable": str(err)}
    flat = _flat({k: resolved[k] for k in ("model", "train")})
    return {k: v for k, v in flat.items() if k not in _NOT_COMPARED}


def settings_for(sets: list[str]) -> dict[str, object]:
    """The settings today's defaults with ``sets`` give."""
    from h2rec.config import RunConfig, apply_overrides, config_to_dict

    return settings_of(config_to_dict(apply_overrides(RunConfig(), sets)))


def _as_today(settings: dict[str, object]) -> dict[str, object]:
    """Recorded settings read as this h2rec reads a saved run: a setting added since takes the
    value that gives the behaviour the run had (a text match, say, was off)."""
    if "unreadable" in settings:
        return settings
    nested: dict[str, dict[str, object]] = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})[name] = value
    return settings_of(nested)


def needs_blend(sets: list[str]) -> bool:
    """Whether today's run of ``sets`` scores with a text blend chosen on validation (every
    dataset here has item embeddings)."""
    from h2rec.blend import blend_applies
    from h2rec.config import RunConfig, apply_overrides

    return blend_applies(apply_overrides(RunConfig(), sets), np.zeros((1, 1)))


def blend_mode(sets: list[str]) -> str:
    """``train.text_blend`` as ``sets`` give it."""
    from h2rec.config import RunConfig, apply_overrides

    return apply_overrides(RunConfig(), sets).train.text_blend


def _blend_is_current(record: dict | None, sets: list[str]) -> bool:
    """Whether a text blend record (of a run or of a result file) is of the kind ``sets`` ask
    for (the TF-IDF rows of h2rec.blend: version 2, or 3 with ``train.text_blend=rare``); the
    datasets here all have item text."""
    from h2rec.blend import wanted_version

    return bool(record) and record.get("version") == wanted_version(  # type: ignore[union-attr]
        blend_mode(sets))


def sets_for(name: str, model: str, seed: int, extra: list[str], threads: int = 0) -> list[str]:
    """The overrides of one run of the table: COMMON, the dataset's own, the model, the
    dataset's own for that model (``model_sets``), the seed, the thread count and the
    command's ``--set``."""
    per_dataset: list[str] = DATASETS[name].get("sets", [])  # type: ignore[assignment]
    per_model: dict[str, list[str]] = DATASETS[name].get("model_sets", {})  # type: ignore[assignment]
    return [*COMMON, *per_dataset, f"model.kind={model}", *per_model.get(model, []),
            f"train.seed={seed}", f"train.num_threads={threads}", *extra]


def is_current(result: dict, sets: list[str] | None = None) -> bool:
    """Whether a result file was made with the settings its ``set`` gives today (its text blend
    included) and, given ``sets``, the settings these give (the table's protocol may change)."""
    from h2rec.errors import ConfigError

    try:
        if "settings" not in result:
            return False
        today = _as_today(result["settings"])
        if today != settings_for(result["set"]):
            return False
        if sets is not None and today != settings_for(sets):
            return False
        if not needs_blend(result["set"]):
            return not result.get("text_blend")
        return _blend_is_current(result.get("text_blend"), result["set"])
    except ConfigError:  # its sets name a setting this h2rec no longer has
        return False


def run_one(name: str, model: str, seed: int, args: argparse.Namespace, threads: int) -> str:
    """Train and evaluate one (dataset, model, seed) into its result file; says what it did."""
    out = Path(args.results) / name / f"{model}-s{seed}.json"
    sets = sets_for(name, model, seed, args.set, threads)
    want = settings_for(sets)
    status = "done"
    if out.exists():
        if is_current(json.loads(out.read_text()), sets):
            return "skipped (done)"
        status = "done again (settings changed)"
    data = prepared(name, Path(args.shared), Path(args.work))
    runs = Path(args.work) / "runs" / name
    tag = f"{model}-s{seed}"
    run_dir = runs / tag
    saved = run_dir / "config.json"
    blend_file = run_dir / "text_blend.json"
    if run_dir.exists() and (
        not saved.exists()
        or settings_of(json.loads(saved.read_text())) != want
        or (blend_file.exists() and not needs_blend(sets))  # blended, asked for without
    ):
        k = 1
        while (runs / f"{tag}.stale-{k}").exists():
            k += 1
        run_dir.rename(runs / f"{tag}.stale-{k}")  # kept, never deleted
        print(f"{run_dir}: not a run of these settings, moved to {tag}.stale-{k}", flush=True)
    if not (run_dir / "metrics.json").exists():
        cmd = ["train", str(data), "--sids", str(data / "sid"), "--name", tag,
               "--output-dir", str(runs)]
        if (run_dir / "last.pt").exists():
            cmd.append("--resume")
        for s in sets:
            cmd += ["--set", s]
        _h2rec(*cmd)
    if needs_blend(sets) and not (
        blend_file.exists() and _blend_is_current(json.loads(blend_file.read_text()), sets)
    ):  # a run trained before the blend (or its TF-IDF rows) existed: choose it now
        _h2rec("blend", str(run_dir), "--overwrite", "--mode", blend_mode(sets),
               "--set", f"train.num_threads={threads}", quiet=True)
    res: dict[str, object] = {"dataset": name, "model": model, "seed": seed, "set": sets,
                              "settings": settings_of(json.loads(saved.read_text()))}
    if needs_blend(sets):
        blend = json.loads(blend_file.read_text())
        res["text_blend"] = {k: blend.get(k) for k in ("version", "kind", "weight", "decay",
                                                       "pop_exponent", "valid_ndcg10")
                             if k in blend}
    for protocol in ("full", "sampled"):
        tmp = out.parent / f".{tag}.{protocol}.tmp.json"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _h2rec("evaluate", str(run_dir), "--split", "test", "--protocol", protocol,
               "--out", str(tmp), "--overwrite", quiet=True)
        (res[protocol],) = json.loads(tmp.read_text())["models"].values()
        res["buckets"] = json.loads(tmp.read_text())["buckets"]
        tmp.unlink()
    hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res["epochs"] = len(hist)
    res["valid_curve"] = [round(h.get("valid", {}).get("NDCG@10", float("nan")), 4) for h in hist]
    res["epoch_seconds"] = [round(h.get("epoch_seconds", float("nan")), 1) for h in hist]
    report = data / "sid" / "sid_report.json"
    if report.exists():
        sid = json.loads(report.read_text())
        res["sid"] = {k: sid.get(k) for k in ("n_levels", "codebook_size", "unique_tuples",
                                                "collision_share", "largest_collision_group")}
        res["sid"]["codebook_usage"] = [lvl.get("usage_share") for lvl in sid.get("levels", [])]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)  # atomic: a result file is complete or absent
    return status


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def current_rows(
    results: Path, name: str, extra: list[str] | None = None
) -> tuple[list[dict], list[str]]:
    """The result files of dataset ``name`` made with today's settings of the table (with
    ``extra`` overrides), and the names of those left out."""
    files = sorted(f for f in (results / name).glob("*-s*.json") if not f.name.startswith("."))
    rows = [json.loads(f.read_text()) for f in files]
    current = [is_current(r, sets_for(name, r.get("model", ""), r.get("seed", 0), extra or []))
               for r in rows]
    stale = [f.name for f, ok in zip(files, current) if not ok]
    return [r for r, ok in zip(rows, current) if ok], stale


def plot(results: Path, out: Path, extra: list[str] | None = None) -> None:
    """Test NDCG@10 by the target's training popularity, per dataset with results: each model's
    mean over its seeds (error bars: the std), and its ratio to SASRec's mean."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from h2rec.report import atomic_writer

    sets = {name: current_rows(results, name, extra)[0] for name in DATASETS}
    sets = {name: rows for name, rows in sets.items() if rows}
    if not sets:
        raise SystemExit(f"--plot: no current result in {results}")
    fig = Figure(figsize=(11, 3.6 * len(sets)))
    with warnings.catch_warnings():  # an empty bucket: NaN bars, not "mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        for d, (name, rows) in enumerate(sets.items()):
            _plot_dataset(fig, len(sets), d, name, rows)
    fig.tight_layout()
    atomic_writer(out, lambda f: fig.savefig(f, format="png", dpi=110))


def _plot_dataset(fig: Any, n_sets: int, d: int, name: str, rows: list[dict]) -> None:
    """Row ``d`` of the figure: dataset ``name``'s buckets and their ratio to SASRec."""
    labels = list(rows[0]["buckets"])
    rows = [r for r in rows if list(r["buckets"]) == labels]  # the same buckets only
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    ax_abs = fig.add_subplot(n_sets, 2, 2 * d + 1)
    ax_rel = fig.add_subplot(n_sets, 2, 2 * d + 2)
    width = 0.8 / len(models)

    def value(r: dict, b: str, key: str) -> float:  # NaN for a missing or empty group
        v = (r["full"]["groups"].get(f"pop_{b}") or {}).get(key)
        return float("nan") if v is None else float(v)

    def per_bucket(model: str) -> np.ndarray:  # (seeds, buckets)
        return np.array([[value(r, b, "NDCG@10") for b in labels]
                         for r in rows if r["model"] == model])

    ref = np.nanmean(per_bucket("sasrec"), axis=0) if "sasrec" in models else None
    for i, model in enumerate(models):
        vals = per_bucket(model)
        mean = np.nanmean(vals, axis=0)
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(labels))]
        err = np.nanstd(vals, axis=0, ddof=1) if len(vals) > 1 else None
        color = f"C{MODELS.index(model)}"  # one colour per model in every panel
        ax_abs.bar(xs, mean, width=width, yerr=err, color=color,
                   label=f"{model} (n={len(vals)})")
        if ref is not None:
            ax_rel.bar(xs, mean / ref, width=width, color=color, label=model)
    n_users = {b: value(rows[0], b, "n") for b in labels}
    for ax, title in ((ax_abs, f"{name}: test NDCG@10"),
                      (ax_rel, f"{name}: NDCG@10 / SASRec's")):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{b}\n(n={n_users[b]:.0f})" for b in labels])
        ax.set_xlabel("target's training popularity")
        ax.set_title(title)
    ax_rel.axhline(1.0, color="black", linewidth=0.8)
    ax_abs.legend(fontsize=8)


def summary(results: Path, extra: list[str] | None = None) -> str:
    """Markdown tables (one per dataset) of mean ± std over the seeds found that hold today's
    settings of the table (with ``extra`` overrides)."""
    lines: list[str] = []
    for name in DATASETS:
        rows, stale = current_rows(results, name, extra)
        if stale:
            lines += [f"({name}: left out, made with other settings than today's: "
                      f"{', '.join(stale)})", ""]
        if not rows:
            continue
        buckets = [f"pop_{b}" for b in rows[0]["buckets"]]
        cols = ["NDCG@10", "HR@10", "head", "tail", *buckets, "short", "long",
                "sampled NDCG@10", "sampled HR@10"]
        lines += [f"### {name} (test, full ranking with history excluded; mean ± std)", "",
                  "| model | seeds | " + " | ".join(cols) + " |",
                  "|---|---:|" + "---:|" * len(cols)]
        for model in MODELS:
            mine = [r for r in rows if r["model"] == model]
            if not mine:
                continue

            def get(r: dict, col: str) -> float | None:
                full, sampled = r["full"], r["sampled"]
                if col in ("NDCG@10", "HR@10"):
                    return full["metrics"][col]
                if col.startswith("sampled "):
                    return sampled["metrics"][col.split(" ", 1)[1]]
                group = full["groups"].get(col)
                return None if group is None else group["NDCG@10"]

            cells = []
            for col in cols:
                vals = [v for v in (get(r, col) for r in mine) if v is not None]
                cells.append(_cell(vals))
            lines.append(f"| {model} | {len(mine)} | " + " | ".join(cells) + " |")
        sid = rows[0].get("sid")
        if sid:
            lines += ["", f"Semantic IDs: {sid['n_levels']} x {sid['codebook_size']}, "
                      f"{sid['unique_tuples']} distinct tuples, collision share "
                      f"{sid['collision_share']:.3f} (largest group {sid['largest_collision_group']}), "
                      f"codebook usage per level {sid['codebook_usage']}."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="../shared/data", help="folder of the dataset folders")
    p.add_argument("--work", default="runs/results", help="prepared data and run folders")
    p.add_argument("--results", default="examples/results/test", help="result files")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="extra config override for every run (recorded in the result file)")
    p.add_argument("--worker", default="0/1", help="i/n: run every n-th job starting at i")
    p.add_argument("--threads", type=int, default=0,
                   help="train.num_threads per run (default: 1 with several workers, else 0)")
    p.add_argument("--summary", action="store_true", help="print the tables of finished runs")
    p.add_argument("--plot", default="",
                   help="with --summary: write the per-bucket PNG of the test tables here")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(Path(args.results), args.set))
        if args.plot:
            plot(Path(args.results), Path(args.plot), args.set)
        return 0
    i, n = (int(v) for v in args.worker.split("/"))
    threads = args.threads or (1 if n > 1 else 0)
    jobs = [(d, m, int(s)) for s in args.seeds.split(",") for d in args.datasets.split(",")
            for m in args.models.split(",")]
    for d, _, _ in jobs:
        if d not in DATASETS:
            p.error(f"--datasets: unknown {d!r} (known: {', '.join(DATASETS)})")
    mine = [job for k, job in enumerate(jobs) if k % n == i]
    t0 = time.time()
    failed = []
    for k, (d, m, s) in enumerate(mine, start=1):
        try:
            status = run_one(d, m, s, args, threads)
        except subprocess.CalledProcessError as e:
            # h2rec has printed why (a bad input, or a run folder another process is writing):
            # say which job it was and go on with the others; the exit status tells the caller
            status = f"FAILED (h2rec {e.cmd[3]} exited with status {e.returncode}; see above)"
            failed.append(f"{d} {m} seed {s}")
        took = time.time() - t0
        print(f"[{k}/{len(mine)}] {d} {m} seed {s}: {status}; {took / 60:.1f} min so far",
              flush=True)
    if failed:
        print(f"{len(failed)} of {len(mine)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
