"""Which half of a trained H2Rec's user vector carries its validation figure.

With fused scores (the default) H2Rec scores item i for a user by ``<s_sid + s_hid, HID_i +
SID_i>``: the sum of its two branches' states against the item's fused vector. This script
takes a finished run apart on the validation split (the test split is never read): each user
is scored with ``alpha * s_sid + s_hid`` for every alpha of a grid (alpha = 1 is the model as
trained, 0 the HID branch alone), with the SID branch alone, and with one half of the item
vector at a time. Checkpoints are read, never written; no text blend is added, so the figures
are the trained model's alone.

    python examples/branch_states.py runs/ml1m-tune/h2rec-d02 --out examples/results/branch-states
    python examples/branch_states.py --summary examples/results/branch-states
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _scorer(model, alpha: float, beta: float, items: str):  # type: ignore[no-untyped-def]
    """A view of a trained H2Rec that h2rec.evaluate scores: user ``alpha * s_sid + beta *
    s_hid`` against the item vectors ``items`` ("fused": HID + SID, "hid", "sid")."""
    import torch
    from torch import nn

    class Scorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.n_items = model.n_items

        def user_states(self, seq: torch.Tensor) -> torch.Tensor:
            s_sid, s_hid, _, _ = self.model._branches(seq, last_only=True)
            return alpha * s_sid + beta * s_hid

        def forward(self, seq: torch.Tensor) -> torch.Tensor:
            s_sid, s_hid, _, _ = self.model._branches(seq)
            return alpha * s_sid + beta * s_hid

        def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
            if items == "hid":  # the HID half of base_item_vectors (popularity gate included)
                return self.model.hid(ids) * self.model.hid_weight(ids)[..., None]
            if items == "sid":
                return self.model.sid(ids)
            return self.model.base_item_vectors(ids)

        def all_item_vectors(self) -> torch.Tensor:
            return self.item_vectors(torch.arange(self.n_items + 1, device=next(self.model.parameters()).device))

    return Scorer()


def branch_states(run: Path, threads: int = 1) -> dict:
    """Validation NDCG@10 (overall, head, tail) of every view of the run folder ``run``."""
    import h2rec  # noqa: F401  (before torch: the thread and wait settings)
    import torch

    from h2rec.evaluate import evaluate
    from h2rec.runs import load_run

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, cfg, ds = load_run(run, apply_blend=False)
        m = cfg.model
        if m.kind != "h2rec" or m.item_score != "fused" or m.branches != "both":
            raise SystemExit(f"{run}: an H2Rec run with fused scores and both branches is needed "
                             f"(model.kind={m.kind!r}, item_score={m.item_score!r}, "
                             f"branches={m.branches!r})")
        if model.text_match is not None:
            raise SystemExit(f"{run}: trained with model.text_match, whose columns this leaves out")
        views = {f"alpha={a:g}": (a, 1.0, "fused") for a in ALPHAS}
        views |= {"SID branch alone": (1.0, 0.0, "fused"), "item HID half": (1.0, 1.0, "hid"),
                  "item SID half": (1.0, 1.0, "sid")}
        out = {}
        for name, (a, b, items) in views.items():
            res = evaluate(_scorer(model, a, b, items), ds.store, "valid", cfg.eval,
                           cfg.model.max_len)
            out[name] = {"NDCG@10": res.metrics["NDCG@10"], "HR@10": res.metrics["HR@10"],
                         "head": res.groups["head"]["NDCG@10"],
                         "tail": res.groups["tail"]["NDCG@10"]}
    finally:
        torch.set_num_threads(before)
    return {"run": str(run), "dataset": Path(cfg.data.path).name, "split": "valid",
            "branch_loss": cfg.model.branch_loss, "branch_dropout": cfg.model.branch_dropout,
            "views": out}


def summary(folder: Path) -> str:
    lines = []
    for f in sorted(folder.glob("*.json")):
        r = json.loads(f.read_text())
        lines += [f"### {f.stem} (validation NDCG@10; model.branch_loss={r['branch_loss']:g}, "
                  f"model.branch_dropout={r.get('branch_dropout', 0.0):g})", "",
                  "| user vector x item vector | NDCG@10 | HR@10 | head | tail |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in r["views"].items():
            lines.append(f"| {name} | {m['NDCG@10']:.4f} | {m['HR@10']:.4f} | {m['head']:.4f} "
                         f"| {m['tail']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="finished H2Rec run folders")
    p.add_argument("--out", default="examples/results/branch-states")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", default="", help="print the table of the JSON files in this folder")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in map(Path, args.runs):
        res = branch_states(run, args.threads)
        tmp = out / f".{run.name}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out / f"{run.name}.json")
        print(f"{run}: alpha=1 {res['views']['alpha=1']['NDCG@10']:.4f}, "
              f"alpha=0 {res['views']['alpha=0']['NDCG@10']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
