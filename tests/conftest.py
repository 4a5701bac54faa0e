"""Shared pytest hooks."""

from __future__ import annotations


# train settings of the small test runs: one CPU thread, no early stop
QUICK_TRAIN = ["train.batch_size=64", "train.num_threads=1", "train.device=cpu", "train.patience=0"]


def pytest_report_header() -> str:
    from h2rec import _core

    return f"h2rec._core: simd_level={_core.simd_level()}, gemm_simd_level={_core.gemm_simd_level()}"


def small_builtin(
    root, n_users: int, n_items: int, seed: int, emb_dim: int, levels: int, codebook: int,
    n_iter: int, save: bool = False,
) -> dict:
    """A generated dataset in ``root`` with TF-IDF embeddings and Semantic IDs: {"path",
    "dataset", "store", "sids", "embeddings", "root"}; with ``save`` the embeddings and the SIDs
    are written into the dataset folder too (embeddings.npy, sid/), as the CLI expects them."""
    import dataclasses

    from h2rec.data import load_dataset
    from h2rec.embed import EmbedOptions, embed_texts, save_embeddings
    from h2rec.semantic_ids import build_sid, save_sids
    from h2rec.synthetic import SyntheticConfig, builtin_dataset

    path = builtin_dataset(root, SyntheticConfig(n_users=n_users, n_items=n_items, seed=seed))
    ds = load_dataset(path)
    emb = embed_texts(ds.item_text, EmbedOptions(dim=emb_dim))
    sids = build_sid(emb, n_levels=levels, codebook_size=codebook, n_iter=n_iter, seed=0)
    if save:
        save_embeddings(emb, path / "embeddings.npy", ds.item_fingerprint)
        sids = dataclasses.replace(sids, item_fingerprint=ds.item_fingerprint)
        save_sids(sids, path / "sid")
    return {"path": path, "dataset": ds, "store": ds.store, "sids": sids, "embeddings": emb,
            "root": root}
