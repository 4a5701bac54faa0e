"""Other forms of the text blend, on the validation split only: do they move the tail?

For each finished run folder, the blend's weight grid (h2rec.blend.BLEND_GRID) is evaluated on
the validation split with the default TF-IDF rows and with variants of them:

- ``pop<g>``: each item's row scaled by (1 + training count)^-g, so that the text weighs more
  for rare items than for popular ones;
- ``bigrams``: the words of each text plus its adjacent word pairs (a product line, "nail
  lacquer", as one term);
- ``attributes``: with ``--attributes FILE``, a JSON object {internal item id: [attribute id,
  ...]} (Beauty's ``Beauty_item2attributes.json``, whose ids are h2rec's internal ids for
  ``user_sequence.txt``: both number items by first appearance), each attribute appended as a
  word of its own.

Each line gives NDCG@10 overall, on head and on tail targets, and, against the grid's best
weight of that variant, the mean per-user difference of NDCG@10 and its paired standard error:
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
        if len(missing) == len(texts):
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


def probe(run: Path, variants: list[str], attributes: dict[str, list[int]] | None) -> list[dict]:
    """One row per (variant, weight): validation NDCG@10 overall, head and tail, and the mean
    per-user difference of NDCG@10 to the variant's best weight with its paired standard error."""
    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    model, cfg, ds = load_run(run, apply_blend=False)
    blend.detach(model)
    texts = list(ds.item_text or [])
    if not blend.has_text(texts):
        raise SystemExit(f"{run}: its dataset's items have no text a blend could use")
    pop = ds.store.popularity(holdout=2).astype(np.float64)  # training counts, row 0 padding
    out: list[dict] = []
    for name in variants:
        g = pop_exponent(name)
        rows = blend.text_rows(variant_text(name, texts, attributes))
        if rows is None:
            raise SystemExit(f"{run}: variant {name}: no word in two items or more")
        if g:
            scale = np.repeat((1.0 + pop) ** -g, np.diff(rows.indptr)).astype(np.float32)
            rows = blend.TextRows(rows.indptr, rows.indices, rows.data * scale, rows.n_terms)
        per: dict[float, tuple[np.ndarray, float, float]] = {}
        for w in blend.BLEND_GRID:
            if w == 0:
                blend.detach(model)
            else:
                blend.attach_rows(model, rows, w)
            r = evaluate(model, ds.store, "valid", cfg.eval, cfg.model.max_len)
            ndcg = np.where(r.ranks < 10, 1.0 / np.log2(r.ranks + 2.0), 0.0)
            per[w] = (ndcg, r.groups["head"]["NDCG@10"], r.groups["tail"]["NDCG@10"])
        best = max(per, key=lambda w: (per[w][0].mean(), -w))
        for w, (ndcg, head, tail) in per.items():
            d = ndcg - per[best][0]
            se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
            out.append({"run": run.name, "variant": name, "weight": w, "ndcg10": float(ndcg.mean()),
                        "head": head, "tail": tail, "diff": float(d.mean()), "se": float(se)})
    return out


def line(row: dict) -> str:
    mark = "\twithin 1 SE" if row["diff"] >= -row["se"] else ""
    head, tail = (f"{row[g]:.4f}" if row[g] is not None else "-" for g in ("head", "tail"))
    return (f"{row['run']}\t{row['variant']}\tweight {row['weight']:g}\tNDCG@10 {row['ndcg10']:.4f}"
            f"\thead {head}\ttail {tail}\tdiff {row['diff']:+.5f} ± "
            f"{row['se']:.5f}{mark}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--variants", default="default,pop0.15,pop0.3,bigrams")
    p.add_argument("--attributes", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import h2rec  # noqa: F401  (before torch: the thread and wait settings)
    import torch

    torch.set_num_threads(args.threads)
    attributes = json.loads(args.attributes.read_text()) if args.attributes else None
    for run in args.runs:
        for row in probe(run, args.variants.split(","), attributes):
            print(line(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
