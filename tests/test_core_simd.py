"""Run-time SIMD dispatch: which kernels run on this CPU, and the portable ones agree with them.

``h2rec._core`` decides once per process (at the first kernel call) between its AVX2 kernels and
the portable ones; ``H2REC_SIMD=scalar`` forces the portable ones, so the comparison runs the
same k-means in a child process with that setting. Both paths sum in the same order, so the
results must be equal bit for bit (tolerance zero).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import h2rec
import numpy as np
import pytest
from h2rec import _core

# Computes every result that goes through the vector kernels (distances, norms, centroid sums:
# k-means++ init, Lloyd updates, residual levels, reconstruction errors) on a fixed input whose
# width (37) leaves a tail after the 16-lane chunks, and saves them to argv[1].
CHILD = """
import sys
import numpy as np
from h2rec import _core

rng = np.random.default_rng(5)
x = (rng.standard_normal((3000, 37)) * rng.uniform(0.01, 100, 37)).astype(np.float32)
c, a = _core.kmeans(x, 24, n_iter=8, seed=3)
cb, ab = _core.kmeans(x, 24, n_iter=4, seed=3, balanced=True)
codes, books = _core.residual_kmeans(x, n_levels=3, codebook_size=16, n_iter=6, seed=1,
                                     normalize_residuals=True)
err = _core.reconstruction_errors(x, codes, books, normalize_residuals=True)
np.savez(sys.argv[1], level=_core.simd_level(), c=c, a=a, cb=cb, ab=ab, codes=codes,
         books=books, err=err)
"""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def run_child(tmp_path: Path, name: str, simd: str) -> dict[str, np.ndarray]:
    out = tmp_path / f"{name}.npz"
    env = {**os.environ, "H2REC_SIMD": simd}
    subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, check=True, timeout=120)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def expected_levels() -> tuple[str, str]:
    """(simd_level, gemm_simd_level) that /proc/cpuinfo implies without H2REC_SIMD."""
    flags = cpu_flags() if platform.machine() in ("x86_64", "AMD64") else set()
    level = "avx2" if "avx2" in flags else "scalar"
    gemm = "avx512" if "avx512f" in flags else "avx2" if "fma" in flags else "scalar"
    return level, gemm


def test_level_is_what_the_cpu_offers():
    level, gemm = _core.simd_level(), _core.gemm_simd_level()
    print(f"simd_level={level} gemm_simd_level={gemm}")
    assert h2rec.simd_level() == level and h2rec.gemm_simd_level() == gemm
    want, want_gemm = expected_levels()
    if os.environ.get("H2REC_SIMD", "").strip().lower() == "scalar":
        want = "scalar"
    assert (level, gemm) == (want, want_gemm), sorted(cpu_flags())


def test_portable_kernels_give_the_same_bits(tmp_path):
    fast = run_child(tmp_path, "auto", "auto")
    slow = run_child(tmp_path, "scalar", "scalar")
    assert (str(fast["level"]), str(slow["level"])) == (expected_levels()[0], "scalar")
    for k in fast:
        if k != "level":
            np.testing.assert_array_equal(fast[k], slow[k], err_msg=k, strict=True)


@pytest.mark.parametrize("value", ["avx9", "sse"])
def test_a_mistyped_setting_fails_the_import(value):
    env = {**os.environ, "H2REC_SIMD": value}
    r = subprocess.run([sys.executable, "-c", "import h2rec._core"], env=env, check=False,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "H2REC_SIMD" in r.stderr, r.stderr
