"""Smoke test of an installed h2rec wheel, run by .ci/run in a fresh virtual environment whose
PATH has no Rust toolchain.

It checks that the extension was installed from the wheel (not built here, not the source tree),
says which SIMD kernels run, and calls the Rust core a few times, also with the portable kernels
forced (they must give the same bits). Where torch is installed (the wheel installed with its
dependencies) it also runs a tiny ``h2rec-train`` on the built-in dataset; CI installs the wheel
with numpy only, since the source install before it already runs everything with torch.
Run it from outside the repository: ``python .ci/wheel_smoke.py`` (a few seconds; about 30 more
with torch).
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The k-means that goes through every vector kernel; the parent compares the child's bytes
# (H2REC_SIMD=scalar) with its own.
KMEANS = """
import sys
import numpy as np
from h2rec import _core
x = np.random.default_rng(0).standard_normal((2000, 37)).astype(np.float32)
codes, books = _core.residual_kmeans(x, n_levels=2, codebook_size=16, n_iter=5, seed=0)
sys.stdout.write(_core.simd_level() + " " + (codes.tobytes() + books.tobytes()).hex())
"""

TINY = [
    "--set", "data.synthetic_users=150",
    "--set", "data.synthetic_items=130",
    "--set", "data.embed_dim=16",
    "--set", "sid.codebook_size=8",
    "--set", "sid.n_iter=5",
    "--set", "model.hidden=16",
    "--set", "model.max_len=10",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=64",
    "--set", "train.device=cpu",
    "--set", "train.num_threads=1",
]  # fmt: skip


def kmeans_in_child(simd: str) -> tuple[str, str]:
    env = {**os.environ, "H2REC_SIMD": simd}
    out = subprocess.run([sys.executable, "-c", KMEANS], env=env, check=True, text=True,
                         capture_output=True, timeout=120).stdout
    level, data = out.split(" ", 1)
    return level, data


def main() -> None:
    t0 = time.perf_counter()
    if isinstance(sys.stdout, io.TextIOWrapper):  # our lines in order with h2rec-train's
        sys.stdout.reconfigure(line_buffering=True)
    for tool in ("cargo", "rustc", "maturin"):
        assert shutil.which(tool) is None, f"{tool} is on PATH: {shutil.which(tool)}"

    import h2rec
    import numpy as np
    from h2rec import _core

    so = Path(_core.__file__).resolve()
    print(f"h2rec {h2rec.__version__} from {so}")
    assert Path(sys.prefix).resolve() in so.parents, f"not the installed wheel: {so}"
    assert so.name == "_core.abi3.so", so.name
    assert _core.build_profile == "release"
    print(f"simd_level={_core.simd_level()} gemm_simd_level={_core.gemm_simd_level()}")

    store = h2rec.SequenceStore.from_sequences([[1, 2, 3, 4, 5], [2, 3, 6, 7], [7, 1, 2]])
    sampler = h2rec.TrainSampler(store, max_len=4, batch_size=2, n_negatives=2, seed=0)
    batches = list(sampler.epoch(0))
    assert len(batches) == sampler.n_batches >= 1 and batches[0][2].shape[2] == 2
    users = np.arange(store.n_users)
    _, targets = store.eval_inputs(users, 4, "test")
    cands = h2rec.sample_candidates(store, users, targets, n_negatives=2, seed=0)
    assert (cands[:, 0] == targets).all()

    fast_level, fast = kmeans_in_child("auto")
    slow_level, slow = kmeans_in_child("scalar")
    assert fast_level == _core.simd_level() and slow_level == "scalar", (fast_level, slow_level)
    assert fast == slow, "the portable kernels give other results than the dispatched ones"
    print(f"k-means: {fast_level} and scalar kernels give the same bits")

    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: no h2rec-train run")
        print(f"wheel smoke test passed in {time.perf_counter() - t0:.1f} s")
        return
    train = Path(sys.executable).with_name("h2rec-train")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(train), "--models", "sasrec,h2rec", "--name", "smoke",
                        "--output-dir", out, *TINY], check=True, timeout=300)
        assert (Path(out) / "smoke" / "metrics.json").is_file()
    print(f"wheel smoke test passed in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
