"""Scale benchmark: what every stage costs as the log grows, on this machine.

For each size N (interactions) a log is generated (``generate``: power-law item popularity,
``N / 100`` items up to 1,000,000, ``N / 20`` users, item text from the built-in generator's
catalogue), then run through the pipeline as a user runs it, each stage its own ``h2rec``
process:

    prepare -> embed (TF-IDF) -> build-sid (3 x 256) -> train (SASRec, one epoch, the sampled
            softmax that ``train.loss=auto`` uses past ``full_softmax_max_items``, the lazy Adam of
            ``train.sparse_items`` for the item table, batches of ``--batch-size`` users)
            -> full-ranking evaluation of a fixed sample of users (``eval.sample_users``)

For each stage: wall time and peak resident memory (the process's ``ru_maxrss``, from
``wait4``), and the time per interaction. The training process also validates and tests on the
user sample; its epoch and its validation are read apart from its ``metrics.jsonl``.

    python benches/scale.py --sizes 1e6,1e7,1e8 --work /scratch/h2rec-scale \\
        --out benches/results/scale.json --plot benches/results/scale.png
    python benches/scale.py --out benches/results/scale.json --table   # the README table

Resumable: a stage whose record is in ``--out`` is skipped (delete the record to redo it), and
the generated logs and stage outputs stay under ``--work``. The figures depend on the machine
and its load; the record keeps the CPU count and the thread setting with each size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("prepare", "embed", "build-sid", "train-epoch", "evaluate")
TEMPLATE = "{title}. Category: {category}. Brand: {brand}"


# --------------------------------------------------------------------------- the log


def generate(n: int, out: Path, seed: int = 0, chunk: int = 5_000_000) -> dict:
    """``interactions.csv`` (user_id,item_id,timestamp) and ``items.csv`` of about ``n`` rows.

    Users (``n / 20``) have 3 + geometric lengths (mean 20) and one favourite product type of
    the built-in catalogue each (titles get two more words from a vocabulary that grows with the
    catalogue, see ``_titles``); an interaction is, with probability 0.6, an item of that type
    by popularity within it, else an item by global popularity (Zipf exponent 1.05). Rows are
    written user by user with increasing timestamps, in chunks, so memory stays bounded."""
    import polars as pl

    from h2rec.synthetic import SyntheticConfig, _catalogue

    out.mkdir(parents=True, exist_ok=True)
    done = out / "generated.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = np.random.default_rng(seed)
    n_items = int(min(1_000_000, max(1_000, n // 100)))
    n_users = max(100, n // 20)
    cat = _catalogue(SyntheticConfig(n_items=n_items, seed=seed), rng)
    leaf = cat.ptype  # (M,) product type of each item
    order = np.argsort(leaf, kind="stable")
    cum = np.cumsum(cat.weight[order])
    lo = np.searchsorted(leaf[order], np.arange(leaf.max() + 1), side="left")
    hi = np.searchsorted(leaf[order], np.arange(leaf.max() + 1), side="right")
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    span = np.where(hi > lo, cum[np.maximum(hi - 1, 0)] - base, 0.0)
    lengths = 3 + rng.geometric(1.0 / 18.0, size=n_users) - 1
    favourite = rng.integers(0, leaf.max() + 1, size=n_users)
    item_ids = np.array([f"i{i}" for i in rng.permutation(n_items)], dtype=object)
    tmp = out / ".interactions.csv.tmp"
    rows = 0
    with open(tmp, "wb") as fh:
        starts = np.concatenate([[0], np.cumsum(lengths)])
        u0 = 0
        while u0 < n_users:
            u1 = int(np.searchsorted(starts, starts[u0] + chunk, side="right")) - 1
            u1 = min(max(u1, u0 + 1), n_users)
            m = int(starts[u1] - starts[u0])
            user = np.repeat(np.arange(u0, u1), lengths[u0:u1])
            own = rng.random(m) < 0.6
            r = rng.random(m)
            fav = favourite[user]
            target = np.where(own & (span[fav] > 0), base[fav] + r * span[fav], r * cum[-1])
            item = order[np.minimum(np.searchsorted(cum, target, side="right"), n_items - 1)]
            gaps = rng.integers(60, 4 * 86_400, size=m)
            first = np.r_[True, user[1:] != user[:-1]]
            gaps[first] = 1_600_000_000 + rng.integers(0, 365 * 86_400, size=int(first.sum()))
            seg = np.cumsum(gaps)
            seg_start = np.maximum.accumulate(np.where(first, seg - gaps, 0))
            ts = seg - seg_start  # per-user running sum of the gaps, from the user's start
            frame = pl.DataFrame({"u": user, "i": item, "timestamp": ts}).select(
                pl.format("u{}", "u").alias("user_id"),
                pl.Series("item_id", item_ids[item].astype(str)),
                "timestamp",
            )
            frame.write_csv(fh, include_header=(u0 == 0))
            rows += m
            u0 = u1
    os.replace(tmp, out / "interactions.csv")
    pl.DataFrame(
        {"item_id": item_ids.astype(str), "title": _titles(cat.titles, rng),
         "category": cat.categories, "brand": cat.brands}
    ).write_csv(out / "items.csv")
    info = {"interactions": rows, "users": n_users, "items": n_items}
    done.write_text(json.dumps(info))
    return info


_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "po", "da", "fe", "gu", "ha",
              "ji", "ko", "la", "mu", "ni", "or", "pe", "qu", "ri", "so", "tu", "va", "we", "xi",
              "yo", "ze", "bra", "cle", "dro", "fli", "gra", "ple", "sto", "tri", "vel", "wix")


def _titles(base: list[str], rng: np.random.Generator) -> list[str]:
    """The catalogue's titles with two descriptive words each, drawn (Zipf) from a vocabulary
    that grows with the catalogue (``n / 10`` words, at least 500), as real catalogues' does:
    the built-in titles alone have a few hundred words whatever the size."""
    n = len(base)
    n_words = max(500, n // 10)
    syl = np.array(_SYLLABLES)
    parts = rng.integers(0, len(syl), size=(n_words, 4))
    words = np.unique(np.char.add(np.char.add(syl[parts[:, 0]], syl[parts[:, 1]]),
                                  np.char.add(syl[parts[:, 2]], syl[parts[:, 3]])))
    weight = 1.0 / np.arange(1, words.size + 1)
    pick = rng.choice(words.size, size=(n, 2), p=weight / weight.sum())
    extra = np.char.add(np.char.add(words[pick[:, 0]], " "), words[pick[:, 1]])
    return [f"{t} {e}" for t, e in zip(base, extra.tolist())]


# --------------------------------------------------------------------------- the stages


def _run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MB of that process). Its output goes to ``log``."""
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[3]} failed (exit {proc.returncode}); {log}:\n{tail}")
    return wall, usage.ru_maxrss / 1024


def run_size(n: int, work: Path, records: dict, save, eval_users: int, threads: int,
             batch_size: int = 128, only: tuple[str, ...] = ()) -> None:
    key = str(n)
    rec = records.setdefault(key, {"n": n, "stages": {}})
    train_sets = [
        "model.kind=sasrec", "train.epochs=1", f"eval.sample_users={eval_users}",
        f"train.batch_size={batch_size}",
        # the loss "auto" picks for large catalogues (4,096 shared popularity negatives,
        # logQ-corrected) at every size, so sizes compare like for like, and the item table's
        # lazy Adam (a dense Adam step over a 1M-item table costs more than the batch)
        "train.full_softmax_max_items=1", "train.sparse_items=true",
    ]
    if rec.get("train_sets") != train_sets:  # trained with other settings: train again
        for stage in ("train-epoch", "evaluate"):
            rec["stages"].pop(stage, None)
    rec.pop("train_batch_size", None)  # the key of earlier versions (train_sets has it)
    rec.update(cpus=os.cpu_count(), threads=threads or "default", eval_users=eval_users,
               train_sets=train_sets)
    root = work / f"n{n}"
    h2rec = [sys.executable, "-m", "h2rec.cli"]
    log = root / "stages.log"
    t0 = time.perf_counter()
    gen = generate(n, root / "log")
    rec["generated"] = gen
    print(f"[{n:,}] log: {gen} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ds, sid, runs = root / "dataset", root / "dataset" / "sid", root / "runs"
    th = [] if not threads else ["--set", f"train.num_threads={threads}"]
    env = dict(os.environ)
    if threads:  # every stage's pools: polars, rayon (the Rust core), torch
        env.update(POLARS_MAX_THREADS=str(threads), RAYON_NUM_THREADS=str(threads),
                   OMP_NUM_THREADS=str(threads))
    stages = {
        "prepare": [*h2rec, "prepare", str(root / "log" / "interactions.csv"), str(ds),
                    "--items", str(root / "log" / "items.csv"), "--template", TEMPLATE,
                    "--overwrite"],
        "embed": [*h2rec, "embed", str(ds), "--backend", "tfidf", "--overwrite"],
        "build-sid": [*h2rec, "build-sid", str(ds), str(sid), "--overwrite"],
        "train": [*h2rec, "train", str(ds), "--sids", str(sid), "--name", "sasrec",
                  "--output-dir", str(runs), "--overwrite",
                  *[a for kv in train_sets for a in ("--set", kv)], *th],
    }
    for name, cmd in stages.items():
        done = rec["stages"]
        if name in done or (name == "train" and "train-epoch" in done):
            continue
        if only and name not in only:
            continue
        wall, rss = _run(cmd, log, env)
        if name == "train":
            epoch = json.loads((runs / "sasrec" / "metrics.jsonl").read_text().splitlines()[0])
            valid_s = epoch["epoch_seconds"] - epoch["train_seconds"]
            done["train-epoch"] = {"seconds": epoch["train_seconds"], "peak_rss_mb": rss,
                                   "process_seconds": wall}
            done["evaluate"] = {"seconds": valid_s, "peak_rss_mb": rss,
                                "users": eval_users, "valid_ndcg10": epoch["valid"]["NDCG@10"]}
        else:
            done[name] = {"seconds": wall, "peak_rss_mb": rss}
        stats = json.loads((ds / "stats.json").read_text())
        rec["dataset"] = {k: stats[k] for k in ("users", "items", "interactions")}
        save()
        shown = "train-epoch" if name == "train" else name
        print(f"[{n:,}] {shown}: {done[shown]['seconds']:.1f} s, "
              f"peak {done[shown]['peak_rss_mb']:.0f} MB", flush=True)


# --------------------------------------------------------------------------- the report


def table(records: dict) -> str:
    """Markdown: seconds, microseconds per interaction and peak RSS of each stage and size,
    and the slope of log time against log size between the smallest and the largest size."""
    sizes = sorted(records.values(), key=lambda r: r["n"])
    head = "| stage | " + " | ".join(f"{r['dataset']['interactions']:,} interactions"
                                     for r in sizes) + " | slope |"
    lines = [head, "|---|" + "---:|" * (len(sizes) + 1)]
    for st in STAGES:
        cells = []
        for r in sizes:
            s = r["stages"].get(st)
            if s is None:
                cells.append("—")
                continue
            per = s["seconds"] / r["dataset"]["interactions"] * 1e6
            cells.append(f"{s['seconds']:.1f} s, {per:.2f} µs/int., {s['peak_rss_mb']:,.0f} MB")
        done = [r for r in sizes if st in r["stages"]]
        slope = "—"
        if len(done) >= 2:
            a, b = done[0], done[-1]
            slope = f"{_slope(a, b, st):.2f}"
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {slope} |")
    return "\n".join(lines)


def _slope(a: dict, b: dict, stage: str) -> float:
    ta, tb = a["stages"][stage]["seconds"], b["stages"][stage]["seconds"]
    na, nb = a["dataset"]["interactions"], b["dataset"]["interactions"]
    return math.log(tb / ta) / math.log(nb / na)


def plot(records: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(records.values(), key=lambda r: r["n"])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for st in STAGES:
        pts = [(r["dataset"]["interactions"], r["stages"][st]) for r in sizes if st in r["stages"]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        ax_t.plot(x, [p[1]["seconds"] for p in pts], marker="o", label=st)
        ax_m.plot(x, [p[1]["peak_rss_mb"] / 1024 for p in pts], marker="o", label=st)
    for ax, ylabel in ((ax_t, "wall time (s)"), (ax_m, "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("h2rec pipeline cost against log size")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="", help="comma-separated interaction counts, e.g. 1e6,1e7")
    p.add_argument("--work", default="runs/scale", help="logs, datasets and runs go here")
    p.add_argument("--out", default="benches/results/scale.json")
    p.add_argument("--plot", default="", help="write the log-log plot here")
    p.add_argument("--table", action="store_true", help="print the Markdown table")
    p.add_argument("--eval-users", type=int, default=100_000)
    p.add_argument("--stages", default="",
                   help="run only these of prepare,embed,build-sid,train (default: all)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="users per training batch (a size whose epoch ran with other training "
                        "settings trains again)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads of every stage (polars, the Rust core, torch); 0: their defaults")
    args = p.parse_args(argv)
    out = Path(args.out)
    records: dict = json.loads(out.read_text()) if out.exists() else {}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(records, indent=2) + "\n")
        os.replace(tmp, out)

    only = tuple(x for x in args.stages.split(",") if x)
    unknown = sorted(set(only) - {"prepare", "embed", "build-sid", "train"})
    if unknown:
        p.error(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from "
                "prepare, embed, build-sid, train")
    for size in (s for s in args.sizes.split(",") if s.strip()):
        run_size(int(float(size)), Path(args.work), records, save, args.eval_users, args.threads,
                 args.batch_size, only)
    if args.table:
        print(table(records))
    if args.plot:
        plot(records, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
