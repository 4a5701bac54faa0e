"""Build-sid stage: Semantic IDs from item embeddings by residual k-means (RQ-KMeans).

Level l clusters the residual that levels < l leave (the k-means itself runs in
``h2rec._core.residual_kmeans``). Distinct items can end up with the same full tuple. With the
collision policy ``none`` (the H2Rec default, where the hash-ID branch keeps items apart) the codes
are kept as they are; with ``dedup`` an extra level numbers the items inside each colliding tuple
0, 1, 2, ... in item order, as TIGER does, so every tuple is unique (items alone in their tuple
get 0). The size of that extra level is the largest collision group.

The report gives, per level, the reconstruction error (mean squared norm of the residual left
after the level, also relative to the mean squared norm of the input), the number of codes used
and the entropy of the code distribution (bits, and as a share of log2 K); and over full tuples
the number of distinct tuples, the share of items whose tuple is shared and the largest group.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from h2rec.errors import DataError

logger = logging.getLogger(__name__)

COLLISIONS = ("none", "dedup")
SID_FORMAT = "h2rec-sids"
SID_VERSION = 1

Collision = Literal["none", "dedup"]


@dataclass(frozen=True)
class SemanticIds:
    """Codes of every item and the codebooks that produced them.

    ``codes``: int64 (n_items, L') with row r = internal item r + 1; L' = L, or L + 1 with
    collision ``dedup``. ``codebooks``: float32 (L, K, D)."""

    codes: np.ndarray
    codebooks: np.ndarray
    codebook_size: int
    collision: str
    report: dict[str, Any] = field(default_factory=dict)
    item_fingerprint: str | None = None  # SHA-256 of the dataset's ordered item ids, if known

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_levels(self) -> int:
        """Levels of the code tuple (L', the dedup level included)."""
        return int(self.codes.shape[1])

    @property
    def level_sizes(self) -> list[int]:
        """Number of possible values per level: K for k-means levels, the largest collision
        group for the dedup level."""
        sizes = [int(self.codebook_size)] * int(self.codebooks.shape[0])
        if self.codes.shape[1] > self.codebooks.shape[0]:
            sizes.append(int(self.codes[:, -1].max()) + 1 if self.codes.size else 1)
        return sizes


def tuple_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id of each row's full tuple (0..G-1) and the size of every group."""
    if codes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1).astype(np.int64), counts.astype(np.int64)


def dedup_level(codes: np.ndarray) -> np.ndarray:
    """The extra level of the ``dedup`` policy: rank of each item inside its tuple group, in
    item order (0 for the first, or only, item of a tuple)."""
    group, _ = tuple_groups(codes)
    order = np.argsort(group, kind="stable")  # items of a group stay in item order
    sorted_group = group[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    first_of_group = np.repeat(starts, np.diff(np.r_[starts, sorted_group.size]))
    rank = np.empty_like(group)
    rank[order] = np.arange(sorted_group.size) - first_of_group
    return rank


def apply_collision_policy(codes: np.ndarray, collision: str) -> np.ndarray:
    """Codes under the policy: unchanged for ``none``, one more level for ``dedup``."""
    if collision == "none":
        return codes
    if collision == "dedup":
        return np.ascontiguousarray(np.column_stack([codes, dedup_level(codes)]), dtype=np.int64)
    raise DataError(f"collision={collision!r} is not one of {', '.join(COLLISIONS)}")


def sid_report(
    x: np.ndarray,
    codes: np.ndarray,
    codebooks: np.ndarray,
    collision: str,
    normalize_residuals: bool = False,
) -> dict[str, Any]:
    """The SID report (JSON-ready): per-level errors, usage, entropy and tuple collisions."""
    from h2rec._core import code_report, reconstruction_errors

    n_levels, k, _ = codebooks.shape
    base = np.ascontiguousarray(codes[:, :n_levels], dtype=np.int64)
    errors = np.asarray(
        reconstruction_errors(x, base, codebooks, normalize_residuals), dtype=np.float64
    )
    total = float(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)))
    core = code_report(base, k)
    usage = [float(u) for u in np.asarray(core["usage"]).reshape(-1)]  # share of K used
    entropy = [float(h) for h in np.asarray(core["entropy"]).reshape(-1)]
    levels = [
        {
            "level": level,
            "reconstruction_error": float(errors[level]),
            "relative_error": float(errors[level] / total) if total > 0 else 0.0,
            "codes_used": round(usage[level] * k),
            "usage_share": usage[level],
            "entropy_bits": entropy[level],
            "entropy_share": entropy[level] / math.log2(k) if k > 1 else 0.0,
        }
        for level in range(n_levels)
    ]
    report: dict[str, Any] = {
        "n_items": int(codes.shape[0]),
        "n_levels": int(n_levels),
        "codebook_size": int(k),
        "dim": int(codebooks.shape[2]),
        "input_mean_squared_norm": total,
        "levels": levels,
        "unique_tuples": int(core["n_unique_tuples"]),  # type: ignore[call-overload]
        "collision_share": float(core["collision_share"]),  # type: ignore[arg-type]
        "largest_collision_group": int(core["largest_collision_group"]),  # type: ignore[call-overload]
        "collision": collision,
    }
    if collision == "dedup":
        report["dedup_level_size"] = int(codes[:, -1].max()) + 1 if codes.size else 1
        _, counts = tuple_groups(codes)
        report["unique_tuples_after_dedup"] = int(counts.size)
    return report


def report_markdown(report: dict[str, Any]) -> str:
    """The SID report as a Markdown page."""
    lines = [
        "# Semantic ID report",
        "",
        (
            f"{report['n_items']:,} items, {report['n_levels']} levels x "
            f"{report['codebook_size']} codes, embedding dim {report['dim']}, "
            f"collision policy `{report['collision']}`."
        ),
        "",
        "| level | recon. error | relative | codes used | usage | entropy (bits) | entropy / log2 K |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in report["levels"]:
        lines.append(
            f"| {lv['level']} | {lv['reconstruction_error']:.4f} | {lv['relative_error']:.3f} | "
            f"{lv['codes_used']} | {lv['usage_share']:.1%} | {lv['entropy_bits']:.2f} | "
            f"{lv['entropy_share']:.3f} |"
        )
    lines += [
        "",
        f"- distinct full tuples: {report['unique_tuples']:,} of {report['n_items']:,}",
        f"- items whose full tuple is shared: {report['collision_share']:.2%}",
        f"- largest collision group: {report['largest_collision_group']}",
    ]
    if report["collision"] == "dedup":
        lines.append(
            f"- dedup level size: {report['dedup_level_size']} "
            f"(distinct tuples after dedup: {report['unique_tuples_after_dedup']:,})"
        )
    return "\n".join(lines) + "\n"


def build_sid(
    embeddings: np.ndarray,
    n_levels: int = 3,
    codebook_size: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    collision: Collision = "none",
    normalize_residuals: bool = False,
    balanced: bool = False,
    n_threads: int | None = None,
) -> SemanticIds:
    """Residual k-means codes for ``embeddings`` (n_items, D) and their report."""
    from h2rec._core import residual_kmeans
    from h2rec.embed import check_embeddings

    if collision not in COLLISIONS:
        raise DataError(f"collision={collision!r} is not one of {', '.join(COLLISIONS)}")
    if n_levels < 1:
        raise DataError(f"n_levels={n_levels}: must be >= 1")
    if codebook_size < 2:
        raise DataError(
            f"codebook_size={codebook_size}: must be >= 2 (one code per level says nothing)"
        )
    if n_iter < 1:
        raise DataError(f"n_iter={n_iter}: must be >= 1 (0 iterations leave random centroids)")
    x = check_embeddings(np.asarray(embeddings), source="embeddings", allow_zero=True)
    if codebook_size > x.shape[0]:
        raise DataError(
            f"codebook_size={codebook_size} is larger than the number of items {x.shape[0]}"
        )
    codes, codebooks = residual_kmeans(
        x,
        n_levels=n_levels,
        codebook_size=codebook_size,
        n_iter=n_iter,
        seed=seed,
        normalize_residuals=normalize_residuals,
        balanced=balanced,
        n_threads=n_threads,
    )
    codes = np.ascontiguousarray(codes, dtype=np.int64)
    codebooks = np.ascontiguousarray(codebooks, dtype=np.float32)
    final = apply_collision_policy(codes, collision)
    report = sid_report(x, final, codebooks, collision, normalize_residuals)
    report["options"] = {
        "n_iter": n_iter,
        "seed": seed,
        "normalize_residuals": normalize_residuals,
        "balanced": balanced,
    }
    logger.info(
        "SIDs: %d items, %d x %d, %.2f%% in colliding tuples, largest group %d",
        x.shape[0], n_levels, codebook_size, 100 * report["collision_share"],
        report["largest_collision_group"],
    )
    return SemanticIds(
        codes=final,
        codebooks=codebooks,
        codebook_size=codebook_size,
        collision=collision,
        report=report,
    )


def save_sids(
    sids: SemanticIds,
    path: str | Path,
    overwrite: bool = True,
    inputs: tuple[str | Path | None, ...] = (),
) -> Path:
    """Write a SID directory (codes, codebooks, report JSON + Markdown, meta) atomically.

    An existing folder is replaced only with ``overwrite``, only if h2rec wrote it as a SID
    folder, and never when it holds one of ``inputs``."""
    from h2rec.outputs import (
        check_output_dir,
        locked,
        named,
        new_dir_beside,
        recover,
        swap_in,
    )

    path = Path(path)
    check_output_dir(path, "sids", overwrite, inputs)
    options = sids.report.get("options", {})
    meta = {
        "format": SID_FORMAT,
        "version": SID_VERSION,
        "n_items": sids.n_items,
        "n_levels": int(sids.codebooks.shape[0]),
        "code_levels": sids.n_levels,
        "codebook_size": int(sids.codebook_size),
        "level_sizes": sids.level_sizes,
        "dim": int(sids.codebooks.shape[2]),
        "collision": sids.collision,
        "seed": options.get("seed"),
        "n_iter": options.get("n_iter"),
        "normalize_residuals": options.get("normalize_residuals"),
        "balanced": options.get("balanced"),
        "item_ids_sha256": sids.item_fingerprint,
    }
    with locked(path, "SID folder"):
        recover(path)
        check_output_dir(path, "sids", overwrite, inputs)
        tmp = new_dir_beside(path, "sids")
        try:
            np.save(tmp / "codes.npy", np.ascontiguousarray(sids.codes, dtype=np.int64))
            np.save(tmp / "codebooks.npy", np.ascontiguousarray(sids.codebooks, dtype=np.float32))
            (tmp / "sid_report.json").write_text(json.dumps(sids.report, indent=2) + "\n", "utf8")
            (tmp / "sid_report.md").write_text(report_markdown(sids.report), "utf8")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf8")
            swap_in(tmp, path)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise named(err, path) from err
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def load_sids(
    path: str | Path, n_items: int | None = None, item_fingerprint: str | None = None
) -> SemanticIds:
    """Read a SID directory written by ``save_sids`` and check it against the dataset: its row
    count ``n_items`` and the fingerprint of its item ids, when given."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a SID directory")
    try:
        meta = json.loads((path / "meta.json").read_text("utf8"))
        report = json.loads((path / "sid_report.json").read_text("utf8"))
        codes = np.load(path / "codes.npy", allow_pickle=False)
        codebooks = np.load(path / "codebooks.npy", allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(f"{exc.filename}: missing; not a complete SID directory") from exc
    except (json.JSONDecodeError, ValueError, OSError, EOFError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: unreadable SID file ({reason})") from exc
    if not isinstance(meta, dict) or not isinstance(report, dict):
        raise DataError(f"{path}: meta.json and sid_report.json must hold JSON objects")
    if meta.get("format") != SID_FORMAT or meta.get("version") != SID_VERSION:
        raise DataError(
            f"{path / 'meta.json'}: format={meta.get('format')!r} version={meta.get('version')!r}, "
            f"expected {SID_FORMAT!r} version {SID_VERSION}"
        )
    if codes.dtype != np.int64 or codes.ndim != 2:
        raise DataError(f"{path / 'codes.npy'}: expected int64 (n_items, L), got {codes.dtype} "
                        f"{codes.shape}")
    if codebooks.dtype != np.float32 or codebooks.ndim != 3:
        raise DataError(f"{path / 'codebooks.npy'}: expected float32 (L, K, D), got "
                        f"{codebooks.dtype} {codebooks.shape}")
    n_levels, k, _ = codebooks.shape
    collision = str(meta.get("collision"))
    expected_levels = n_levels + (1 if collision == "dedup" else 0)
    if collision not in COLLISIONS or codes.shape[1] != expected_levels:
        raise DataError(
            f"{path}: codes have {codes.shape[1]} levels, codebooks {n_levels}, "
            f"collision={collision!r}"
        )
    if codes.size and (codes.min() < 0 or codes[:, :n_levels].max() >= k):
        raise DataError(f"{path / 'codes.npy'}: codes outside 0..{k - 1}")
    if n_items is not None and codes.shape[0] != n_items:
        raise DataError(
            f"{path / 'codes.npy'}: {codes.shape[0]} rows, but the dataset has {n_items} items"
        )
    saved = meta.get("item_ids_sha256")
    if item_fingerprint is not None and saved is not None and saved != item_fingerprint:
        raise DataError(
            f"{path}: Semantic IDs built for other item ids (fingerprint {str(saved)[:12]}, "
            f"this dataset {item_fingerprint[:12]}: another dataset, or the same items in "
            "another order); rebuild them: h2rec embed, then h2rec build-sid"
        )
    if item_fingerprint is not None and saved is None:
        logger.warning("%s: no item fingerprint (built from embeddings without one); matched "
                       "to the dataset by its row count only", path)
    return SemanticIds(
        codes=codes,
        codebooks=codebooks,
        codebook_size=int(meta.get("codebook_size", k)),
        collision=collision,
        report=report,
        item_fingerprint=str(saved) if saved else None,
    )


def build_sid_dir(
    embeddings_path: str | Path,
    out: str | Path,
    n_levels: int = 3,
    codebook_size: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    collision: Collision = "none",
    normalize_residuals: bool = False,
    balanced: bool = False,
    overwrite: bool = False,
) -> SemanticIds:
    """Read ``embeddings.npy``, build the SIDs and write the SID directory ``out`` (an existing
    one only with ``overwrite``; never the folder holding the embeddings)."""
    from dataclasses import replace

    from h2rec.embed import load_npy, read_item_fingerprint
    from h2rec.outputs import check_output_dir

    check_output_dir(Path(out), "sids", overwrite, (embeddings_path,))  # before the k-means
    x = load_npy(embeddings_path, normalize=False)
    sids = build_sid(
        x,
        n_levels=n_levels,
        codebook_size=codebook_size,
        n_iter=n_iter,
        seed=seed,
        collision=collision,
        normalize_residuals=normalize_residuals,
        balanced=balanced,
    )
    sids = replace(sids, item_fingerprint=read_item_fingerprint(embeddings_path))
    save_sids(sids, out, overwrite=overwrite, inputs=(embeddings_path,))
    return sids


__all__ = [
    "COLLISIONS",
    "SemanticIds",
    "apply_collision_policy",
    "build_sid",
    "build_sid_dir",
    "dedup_level",
    "load_sids",
    "report_markdown",
    "save_sids",
    "sid_report",
    "tuple_groups",
]
