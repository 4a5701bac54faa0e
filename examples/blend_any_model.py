"""The text blend added to finished runs of any model, SASRec included, without saving it: is
H2Rec's gain over SASRec the blend's?

h2rec gives the text blend (h2rec.blend) to the models that read item text only; SASRec stays the
hash-ID baseline of the results table. This script answers the reviewer's question on the same
finished runs: for each run folder it chooses the blend on the validation split exactly as
training does (``blend.choose``, the TF-IDF rows of the dataset's item text, the weight grid),
evaluates the test split with it, and writes one small JSON per run. Checkpoints are read, never
written; the test split is read once, after the choice.

    python examples/blend_any_model.py runs/results/runs/beauty/sasrec-s{0,1,2} \\
        --out examples/results/blend-any-model/beauty --threads 1
    python examples/blend_any_model.py --summary examples/results/blend-any-model/beauty
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def blend_run(run: Path, threads: int, mode: str = "auto") -> dict:
    """The blend chosen on validation for the run folder ``run``, and its test metrics."""
    import h2rec  # noqa: F401  (before torch: the thread and wait settings)
    import torch

    overrides = [f"train.num_threads={threads}"] if threads else []
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        return _blend_run(run, overrides, mode)
    finally:
        torch.set_num_threads(before)


def _blend_run(run: Path, overrides: list[str], mode: str = "auto") -> dict:
    from h2rec import blend
    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    model, cfg, ds = load_run(run, overrides=overrides, apply_blend=False)
    blend.detach(model)

    def valid(m: object) -> object:
        return evaluate(m, ds.store, "valid", cfg.eval, cfg.model.max_len)  # type: ignore[arg-type]

    record = blend.choose(model, None, valid, ds.item_text, ds.store.popularity(holdout=2), mode)
    if record is None:
        raise SystemExit(f"{run}: its dataset's items have no text a blend could use")
    test = evaluate(model, ds.store, "test", cfg.eval, cfg.model.max_len)
    groups = {g: m["NDCG@10"] for g, m in test.groups.items()
              if m is not None and m.get("NDCG@10") is not None}  # an empty group has none
    return {"run": str(run), "model": cfg.model.kind, "seed": cfg.train.seed,
            "weight": record["weight"], "pop_exponent": record.get("pop_exponent", 0.0),
            "mode": mode, "valid_ndcg10": record["valid_ndcg10"],
            "test": {"NDCG@10": test.metrics["NDCG@10"], "HR@10": test.metrics["HR@10"],
                     "groups_ndcg10": groups}}


def summary(folder: Path) -> str:
    """Mean ± std over the result files of ``folder``, per model."""
    rows = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
    out = ["| model + blend | runs | weights | NDCG@10 | HR@10 | head | tail |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]

        def cell(values: list[float | None]) -> str:
            values = [v for v in values if v is not None]
            if not values:
                return "-"
            if len(values) == 1:
                return f"{values[0]:.4f}"
            return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"

        t = [r["test"] for r in mine]
        weights = ", ".join(format(r["weight"], "g") + (
            f" (g {r['pop_exponent']:g})" if r.get("mode") == "rare" else "") for r in mine)
        out.append(
            f"| {model} | {len(mine)} | {weights} | "
            f"{cell([x['NDCG@10'] for x in t])} | {cell([x['HR@10'] for x in t])} | "
            f"{cell([x['groups_ndcg10'].get('head') for x in t])} | "
            f"{cell([x['groups_ndcg10'].get('tail') for x in t])} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="finished run folders")
    p.add_argument("--out", type=Path, help="folder of the result files (one per run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: h2rec's default)")
    p.add_argument("--summary", type=Path, help="print the table of a folder of result files")
    p.add_argument("--mode", choices=("auto", "rare"), default="auto",
                   help="the blend chosen: auto (the weight), rare (rows scaled by popularity too)")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if not args.runs or args.out is None:
        p.error("give run folders and --out (or --summary FOLDER)")
    from h2rec.report import write_text_atomic

    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        res = blend_run(run, args.threads, args.mode)
        name = f"{res['model']}-s{res['seed']}.json"
        write_text_atomic(args.out / name, json.dumps(res, indent=1) + "\n")
        print(f"{run}: weight {res['weight']:g}, pop exponent {res['pop_exponent']:g}, test NDCG@10 {res['test']['NDCG@10']:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
