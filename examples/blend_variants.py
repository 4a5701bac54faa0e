"""Other forms of the text blend, on the validation split only: do they move the tail?

For each finished run folder, the blend's weight grid (h2rec.blend.BLEND_GRID) is evaluated on
the validation split with the default TF-IDF rows and with variants of them:

- ``pop<g>``: each item's row scaled by (1 + training count)^-g, so that the text weighs more
  for rare items than for popular ones, both as candidates and in the history's profile (every
  scale is at most 1: the best weight moves up; ``--weights`` extends the grid);
- ``bigrams``: the words of each text plus its adjacent word pairs (a product line, "nail
  lacquer", as one term);
- ``attributes``: with ``--attributes FILE``, a JSON object {internal item id: [attribute id,
  ...]} (Beauty's ``Beauty_item2attributes.json``, whose ids are h2rec's internal ids for
  ``user_sequence.txt``: both number items by first appearance), each attribute appended as a
  word of its own.

Each line gives NDCG@10 overall, on head and on tail targets, and, against the grid's best
weight of that variant (and of the ``default`` variant, when it is listed first), the mean
per-user difference of NDCG@10 and its paired standard error:
the weights within one standard error of the best are marked, for a "tail among the ties"
choice (which weight has the best tail among those the overall figure cannot tell apart). The
test split is never read; checkpoints are read, never written.

    python examples/blend_variants.py runs/results/runs/beauty/fusion-s0 \\
        --variants default,pop0.15,pop0.3,bigrams,attributes \\
        --attributes ../shared/data/beauty/Beauty_item2attributes.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def variant_text(name: str, texts: list[str], attributes: dict[str, list[int]] | None) -> list[str]:
    """The item text of variant ``name`` (entry r: internal item r + 1)."""
    if name == "bigrams":
        out = []
        for t in texts:
            words = re.findall(r"\w+", (t or "").lower())
            out.append(" ".join(words + [f"{a}_{b}" for a, b in zip(words, words[1:])]))
        return out
    if name == "attributes":
        if attributes is None:
            raise SystemExit("the attributes variant needs --attributes FILE")
        missing = [r + 1 for r in range(len(texts)) if str(r + 1) not in attributes]
        if texts and len(missing) == len(texts):
            raise SystemExit("--attributes: no key is an internal item id of this dataset")
        return [f"{t or ''} " + " ".join(f"attr{a}" for a in attributes.get(str(r + 1), []))
                for r, t in enumerate(texts)]
    if name == "default" or name.startswith("pop"):
        return texts
    raise SystemExit(f"--variants: unknown variant {name!r} (default, pop<g>, bigrams, attributes)")


def pop_exponent(name: str) -> float:
    """g of a ``pop<g>`` variant; 0 for the others."""
    if not name.startswith("pop"):
        return 0.0
    try:
        g = float(name[3:])
    except ValueError:
        raise SystemExit(f"--variants: {name!r} is not pop<g> with a number g") from None
    if not np.isfinite(g):
        raise SystemExit(f"--variants: {name!r}: g must be finite")
    return g


def check_variants(names: list[str], attributes: dict[str, list[int]] | None) -> None:
    """Every variant name known (and its file given) before any run is read."""
    for name in names:
        pop_exponent(name)
        variant_text(name, [], attributes if attributes is not None else ({} if name != "attributes" else None))


def load_attributes(path: Path) -> dict[str, list[int]]:
    """``--attributes``: a JSON object {internal item id: [attribute id, ...]}."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SystemExit(f"--attributes {path}: not a readable JSON file: {err}") from None
    if not isinstance(obj, dict):
        raise SystemExit(f"--attributes {path}: expected a JSON object, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, list) or not all(isinstance(a, int) for a in value):
            raise SystemExit(f"--attributes {path}: item {key!r}: expected a list of integer "
                             f"attribute ids, found {value!r:.60}")
    return obj


def probe(
    run: Path,
    variants: list[str],
    attributes: dict[str, list[int]] | None,
    weights: tuple[float, ...] | None = None,
) -> Iterator[dict]:
    """Rows, one per (variant, weight), as each variant finishes: validation NDCG@10 overall,
    head and tail; the mean per-user difference of NDCG@10 to the variant's best weight with
    its paired standard error (``diff``, ``se``) and, when ``default`` is among the variants
    and comes first, the same against the default's best weight (``diff_default``,
    ``se_default``); ``edge``: the variant's best weight is the largest tried."""
    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    check_variants(variants, attributes)
    weights = tuple(blend.BLEND_GRID if weights is None else weights)
    model, cfg, ds = load_run(run, apply_blend=False)
    blend.detach(model)
    texts = list(ds.item_text or [])
    if not blend.has_text(texts):
        raise SystemExit(f"{run}: its dataset's items have no text a blend could use")
    pop = ds.store.popularity(holdout=2).astype(np.float64)  # training counts, row 0 padding

    def scored() -> tuple[np.ndarray, float | None, float | None]:
        r = evaluate(model, ds.store, "valid", cfg.eval, cfg.model.max_len)
        ndcg = np.where(r.ranks < 10, 1.0 / np.log2(r.ranks + 2.0), 0.0)
        return ndcg, r.groups["head"]["NDCG@10"], r.groups["tail"]["NDCG@10"]

    def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        d = a - b
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0

    bare = scored() if 0.0 in weights else None  # weight 0: the model alone, whatever the rows
    default_best: np.ndarray | None = None
    for name in variants:
        g = pop_exponent(name)
        rows = blend.text_rows(variant_text(name, texts, attributes))
        if rows is None:
            raise SystemExit(f"{run}: variant {name}: no word in two items or more")
        if rows.n_rows != pop.size:
            raise SystemExit(f"{run}: {rows.n_rows - 1} items of text for {pop.size - 1} items")
        rows = blend.popularity_scaled(rows, pop, g)  # the default blend's own scaling
        per: dict[float, tuple[np.ndarray, float | None, float | None]] = {}
        for w in weights:
            if w == 0:
                per[w] = bare  # type: ignore[assignment]
                continue
            blend.attach_rows(model, rows, w)
            per[w] = scored()
        blend.detach(model)
        best = max(per, key=lambda w: (per[w][0].mean(), -w))
        if name == "default":
            default_best = per[best][0]
        for w, (ndcg, head, tail) in per.items():
            diff, se = paired(ndcg, per[best][0])
            row = {"run": run.name, "variant": name, "weight": w, "ndcg10": float(ndcg.mean()),
                   "head": head, "tail": tail, "diff": diff, "se": se,
                   "edge": best == max(weights) and w == best}
            if default_best is not None:
                row["diff_default"], row["se_default"] = paired(ndcg, default_best)
            yield row


def line(row: dict) -> str:
    mark = "\twithin 1 SE" if row["diff"] >= -row["se"] else ""
    if row["edge"]:
        mark += "\tbest at the largest weight tried (try --weights)"
    head, tail = (f"{row[g]:.4f}" if row[g] is not None else "-" for g in ("head", "tail"))
    against = (f"\tvs default's best {row['diff_default']:+.5f} ± {row['se_default']:.5f}"
               if "diff_default" in row else "")
    return (f"{row['run']}\t{row['variant']}\tweight {row['weight']:g}\tNDCG@10 {row['ndcg10']:.4f}"
            f"\thead {head}\ttail {tail}\tdiff {row['diff']:+.5f} ± {row['se']:.5f}{against}{mark}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--variants", default="default,pop0.15,pop0.3,bigrams")
    p.add_argument("--attributes", type=Path, default=None)
    p.add_argument("--weights", default="", help="comma-separated weights (default: the blend's grid)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be 1 or more, got {args.threads}")
    try:
        weights = tuple(float(w) for w in args.weights.split(",")) if args.weights else None
    except ValueError:
        p.error(f"--weights: not a list of numbers: {args.weights!r}")
    if weights is not None and not all(np.isfinite(w) and w >= 0 for w in weights):
        p.error(f"--weights: every weight must be finite and >= 0: {args.weights!r}")
    attributes = load_attributes(args.attributes) if args.attributes else None
    variants = args.variants.split(",")
    check_variants(variants, attributes)
    import h2rec  # noqa: F401  (before torch: the thread and wait settings)
    import torch

    torch.set_num_threads(args.threads)
    for run in args.runs:
        for row in probe(run, variants, attributes, weights):
            print(line(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
