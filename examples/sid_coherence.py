"""How well Semantic IDs follow behaviour: the share of training transitions whose two items
share a code prefix, against chance.

For every user's training prefix (the sequence without its last two items, the validation and
test targets) and every step a -> b in it, the script asks whether b shares a's first code, its
first two codes, ... its whole tuple. Chance is the same share after the next items are shuffled
across all transitions (one seeded permutation: the same popularity, no order). Codes that
read only the text group items that read alike; codes built with ``h2rec embed --behaviour``
group items used together, and score higher here.

    python examples/sid_coherence.py runs/results/data/ml-1m runs/results/data/ml-1m/sid \\
        data/ml-1m/sid-behaviour
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def transitions(offsets: np.ndarray, items: np.ndarray, holdout: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Every step (a, b) of the training prefixes as two arrays of 0-based item rows."""
    lengths = np.diff(offsets)
    end = np.repeat(offsets[:-1] + np.maximum(lengths - holdout, 0), lengths)
    pos = np.flatnonzero(np.arange(items.size) + 1 < end)  # a step needs its next item kept
    return items[pos].astype(np.int64) - 1, items[pos + 1].astype(np.int64) - 1


def coherence(codes: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, list[float]]:
    """Share of steps whose items share the first 1..L codes, and the same after shuffling b."""
    shuffled = b[np.random.default_rng(seed).permutation(b.size)]
    out: dict[str, list[float]] = {"shared_prefix": [], "chance": []}
    same = np.ones(a.size, dtype=bool)
    same_r = np.ones(a.size, dtype=bool)
    for level in range(codes.shape[1]):
        same &= codes[a, level] == codes[b, level]
        same_r &= codes[a, level] == codes[shuffled, level]
        out["shared_prefix"].append(float(same.mean()))
        out["chance"].append(float(same_r.mean()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="dataset directory written by prepare")
    p.add_argument("sids", type=Path, nargs="+", help="SID directories (with codes.npy)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from h2rec.data import load_dataset
    from h2rec.errors import DataError

    store = load_dataset(args.dataset).store
    a, b = transitions(np.asarray(store.offsets), np.asarray(store.items))
    report = {}
    for sid in args.sids:
        codes = np.load(sid / "codes.npy")
        if codes.ndim != 2 or codes.shape[0] != store.n_items:
            raise DataError(f"{sid / 'codes.npy'}: shape {codes.shape}, the dataset has "
                            f"{store.n_items} items")
        r = coherence(codes, a, b)
        report[str(sid)] = r
        levels = ", ".join(f"{x:.4f} ({c:.4f})" for x, c in zip(r["shared_prefix"], r["chance"]))
        print(f"{sid}: {a.size:,} steps; next item shares the first 1..{codes.shape[1]} codes: "
              f"{levels} (chance in brackets)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
