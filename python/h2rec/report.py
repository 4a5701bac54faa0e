"""Reports: ``metrics.json``, a Markdown table and a PNG of NDCG@10 by popularity bucket.

Every file is written atomically: to a temporary name in the target directory, then renamed,
so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_writer",
    "markdown_table",
    "plot_buckets",
    "write_bytes_atomic",
    "write_json",
    "write_report",
    "write_text_atomic",
]


@contextmanager
def _ctrl_c_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block ends, then raise
    KeyboardInterrupt. Inside ``torch.save``, a KeyboardInterrupt raised in the middle of its
    zip writer came out as "RuntimeError: unexpected pos ..."; held, the file is written whole
    (and renamed into place) first. Only in the main thread with Python's default handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt from None
        raise
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def atomic_writer(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.
    A Ctrl-C meanwhile is raised once the file is in place (``_ctrl_c_after``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _ctrl_c_after():
            _write_and_replace(fd, tmp, path, write)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_and_replace(fd: int, tmp: str, path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into the open ``fd``, fsync, then rename ``tmp`` to ``path``."""
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        from h2rec.outputs import named

        raise named(err, path) from err
    except Exception as err:  # torch reports a full disk as "unexpected pos ..."
        from h2rec.outputs import check_free_space

        check_free_space(path, err)
        raise
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    atomic_writer(path, write)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _json_safe(value.item())
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON (NaN/inf become null), atomically."""
    write_text_atomic(path, json.dumps(_json_safe(payload), indent=2) + "\n")


# --------------------------------------------------------------------------- table

_TABLE_GROUPS = ("overall", "head", "tail")


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def markdown_table(
    results: Mapping[str, Mapping[str, Any]],
    metrics: tuple[str, ...] = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR"),
    groups: tuple[str, ...] = _TABLE_GROUPS,
) -> str:
    """One Markdown table: a row per (model, group), a column per metric.

    ``results`` maps a model name to an evaluation summary (``EvalResult.to_dict()``: keys
    ``metrics`` and ``groups``)."""
    header = "| model | group | users | " + " | ".join(metrics) + " |"
    rule = "|---|---|---:|" + "---:|" * len(metrics)
    lines = [header, rule]
    for model, res in results.items():
        for g in groups:
            if g == "overall":
                row = dict(res["metrics"])
                n = res.get("n_users")
            else:
                grp = res["groups"].get(g)
                if grp is None:
                    continue
                row = grp
                n = grp.get("n")
            cells = " | ".join(_fmt(row.get(m)) for m in metrics)
            lines.append(f"| {model} | {g} | {n if n is not None else '-'} | {cells} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plot


def plot_buckets(
    results: Mapping[str, Mapping[str, Any]], labels: list[str], path: Path, metric: str = "NDCG@10"
) -> None:
    """Grouped bar chart of ``metric`` per popularity bucket, one bar per model; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * len(labels) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    n_models = max(len(results), 1)
    width = 0.8 / n_models
    for i, (model, res) in enumerate(results.items()):
        values = []
        for label in labels:
            v = res["groups"].get(f"pop_{label}", {}).get(metric)
            values.append(0.0 if v is None else float(v))
        xs = [j + (i - (n_models - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=model)
    counts = []
    first = next(iter(results.values()), None)
    for label in labels:
        n = first["groups"].get(f"pop_{label}", {}).get("n") if first else None
        counts.append(f"{label}\n(n={n})" if n is not None else label)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(counts)
    ax.set_xlabel("target popularity in training")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by item popularity")
    ax.legend()
    fig.tight_layout()

    def write(f: BinaryIO) -> None:
        fig.savefig(f, format="png", dpi=120)

    atomic_writer(Path(path), write)


def write_report(
    out_dir: Path,
    results: Mapping[str, Mapping[str, Any]],
    bucket_labels: list[str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """``metrics.json``, ``results.md`` and ``ndcg10_by_popularity.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    payload: dict[str, Any] = {"models": dict(results)}
    if extra:
        payload.update(extra)
    paths = {
        "metrics": out_dir / "metrics.json",
        "table": out_dir / "results.md",
        "plot": out_dir / "ndcg10_by_popularity.png",
    }
    write_json(paths["metrics"], payload)
    write_text_atomic(paths["table"], markdown_table(results))
    plot_buckets(results, bucket_labels, paths["plot"])
    return paths
