"""How much tail a popularity correction buys, and at what cost to the head (validation only).

For each finished run folder, every evaluated user's scores get ``- lam * log(1 + c_i)`` for
each item i, c_i its training count (the counts the text blend reads), on top of the run's own
scores (its text blend included), for each ``lam`` of ``--lambdas``: lam > 0 pushes popular
items down (the tail up), lam < 0 the other way. Each line gives NDCG@10 overall, on head and
on tail targets (the Pareto split of the evaluation), and the mean per-user difference of
NDCG@10 to lam = 0 with its paired standard error. Checkpoints are read, never written; the
test split is read only with ``--split test``, which is not for choosing anything.

    python examples/popularity_prior.py runs/results/runs/ml-1m/h2rec-s0 \\
        --lambdas=-0.2,-0.1,-0.05,0,0.03,0.1,0.3,0.6 --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _prior_term(inner, log_counts, lam: float):
    """A score term for the model's ``text_blend`` slot: the run's own term (``inner``, or
    None) plus ``-lam * log(1 + c_i)`` for every item column."""
    import torch

    class PopularityPrior(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("offset", (-lam * log_counts).float(), persistent=False)

        def add_to(self, scores: torch.Tensor, seq: torch.Tensor) -> None:
            if self.inner is not None:
                self.inner.add_to(scores, seq)
            scores += self.offset.to(scores.device)[None, :]

        def forward(self, seq: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
            off = self.offset.to(seq.device)
            term = (off[None, :].expand(seq.shape[0], -1) if candidates is None
                    else off[candidates])
            if self.inner is not None:
                term = term + self.inner(seq, candidates).float()
            return term

    return PopularityPrior()


def probe(run: Path, lambdas: tuple[float, ...], split: str = "valid") -> Iterator[dict]:
    """Rows, one per lam: NDCG@10 and HR@10 overall, NDCG@10 on head and tail targets, and the
    paired difference of per-user NDCG@10 to lam = 0 (``diff``, ``se``)."""
    import torch

    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    model, cfg, ds = load_run(run)
    inner = getattr(model, "text_blend", None)
    counts = ds.store.popularity(holdout=2).astype(np.float64)  # training counts, row 0 padding
    log_counts = torch.from_numpy(np.log1p(counts))

    def scored(lam: float) -> dict:
        model.text_blend = inner if lam == 0 else _prior_term(inner, log_counts, lam)
        try:
            r = evaluate(model, ds.store, split, cfg.eval, cfg.model.max_len)
        finally:
            model.text_blend = inner
        ndcg = np.where(r.ranks < 10, 1.0 / np.log2(r.ranks + 2.0), 0.0)
        return {"ndcg": ndcg, "NDCG@10": r.metrics["NDCG@10"], "HR@10": r.metrics["HR@10"],
                "head": r.groups["head"]["NDCG@10"], "tail": r.groups["tail"]["NDCG@10"]}

    base = scored(0.0)
    for lam in lambdas:
        s = base if lam == 0 else scored(lam)
        d = s["ndcg"] - base["ndcg"]
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
        yield {"run": run.name, "split": split, "lam": lam, "ndcg10": s["NDCG@10"],
               "hr10": s["HR@10"], "head": s["head"], "tail": s["tail"],
               "diff": float(d.mean()), "se": se}


def line(row: dict) -> str:
    head, tail = (f"{row[g]:.4f}" if row[g] is not None else "-" for g in ("head", "tail"))
    return (f"{row['run']}\t{row['split']}\tlam {row['lam']:g}\tNDCG@10 {row['ndcg10']:.4f}"
            f"\tHR@10 {row['hr10']:.4f}\thead {head}\ttail {tail}"
            f"\tvs lam 0 {row['diff']:+.5f} ± {row['se']:.5f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--lambdas", default="-0.2,-0.1,0,0.1,0.3,0.6",
                   help="comma-separated values; one starting with a minus sign needs --lambdas=...")
    p.add_argument("--split", choices=("valid", "test"), default="valid")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be 1 or more, got {args.threads}")
    try:
        lambdas = tuple(float(x) for x in args.lambdas.split(","))
    except ValueError:
        p.error(f"--lambdas: not a list of numbers: {args.lambdas!r}")
    if not all(np.isfinite(x) for x in lambdas):
        p.error(f"--lambdas: every value must be finite: {args.lambdas!r}")
    for run in args.runs:
        if not (run / "config.json").is_file():
            p.error(f"{run}: not a run folder (no config.json)")
    import h2rec  # noqa: F401  (before torch: the thread and wait settings)
    import torch

    torch.set_num_threads(args.threads)
    for run in args.runs:
        for row in probe(run, lambdas, args.split):
            print(line(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
