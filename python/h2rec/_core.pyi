"""Stub of the compiled extension ``h2rec._core`` (Rust, PyO3).

Conventions: item ids, sequences, targets, negatives and codes are int64 with 0 meaning padding
and real items numbered 1..n_items; CSR offsets are int64; embeddings are float32 and
C-contiguous. Users are addressed by their row in the store, 0..n_users-1. Every random call takes
a seed, and each output row draws from its own stream, so results do not depend on the thread
count. ``n_threads=None`` uses the global pool (all cores, or ``RAYON_NUM_THREADS``).
"""

from collections.abc import Iterator, Sequence
from typing import Literal, final

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "__version__",
    "EpochIter",
    "SequenceStore",
    "TrainSampler",
    "assign_codes",
    "build_profile",
    "code_report",
    "cooccurrence",
    "csr_matmul",
    "dropout_mask",
    "gemm_simd_level",
    "item_scores",
    "kmeans",
    "linear",
    "reconstruction_errors",
    "residual_kmeans",
    "sample_candidates",
    "simd_level",
    "text_scores",
]

__version__: str
build_profile: Literal["release", "debug"]

def simd_level() -> Literal["avx2", "scalar"]:
    """Instruction set of the vector kernels (k-means distances and norms, centroid sums),
    decided when the module is imported: ``"avx2"`` when the CPU has it, else ``"scalar"`` (portable
    x86-64 or other architectures). ``H2REC_SIMD=scalar`` in the environment forces the portable
    kernels (``auto``, the default, and ``avx2`` never go beyond what the CPU has); any other value
    makes the import fail. Both paths return the same bits."""

def gemm_simd_level() -> Literal["avx512", "avx2", "scalar"]:
    """Instruction set the ``gemm`` crate runs the k-means distance GEMM with, chosen by the crate
    from the CPU alone (AVX-512F, else FMA with AVX2, else scalar); ``H2REC_SIMD`` does not
    change it."""

_I64 = NDArray[np.int64]
_F32 = NDArray[np.float32]

@final
class SequenceStore:
    """Users' chronological item sequences in CSR form, validated once at construction.

    Array arguments may be any integer array-like; they are copied in, and anything else is a
    TypeError. C-contiguous int64 ``offsets`` with int32 ``items`` over memory nothing can
    write (what ``np.load(path, mmap_mode="r")`` gives for a dataset directory: the chain of
    ``.base`` ends in a read-only buffer) are read in place instead: the store keeps the arrays
    alive and never writes to them (``borrowed``). An array merely flagged read-only is
    copied, since its flag can be set back."""

    def __new__(
        cls, offsets: ArrayLike, items: ArrayLike, n_items: int | None = None
    ) -> SequenceStore: ...
    @staticmethod
    def from_sequences(
        sequences: Sequence[Sequence[int]], n_items: int | None = None
    ) -> SequenceStore: ...
    @property
    def n_users(self) -> int: ...
    @property
    def n_items(self) -> int: ...
    @property
    def n_interactions(self) -> int: ...
    @property
    def borrowed(self) -> bool:
        """Whether the arrays are read in place rather than copied."""
    @property
    def offsets(self) -> _I64: ...
    @property
    def items(self) -> _I64: ...
    def __len__(self) -> int: ...
    def lengths(self) -> _I64: ...
    def sequence(self, user: int) -> _I64: ...
    def popularity(self, holdout: int = 0) -> _I64:
        """Interaction count per item id, shape (n_items + 1,), index 0 is 0.

        ``holdout=2`` counts the training prefixes only (leave-one-out)."""
    def eval_inputs(
        self, users: ArrayLike, max_len: int, split: Literal["valid", "test"]
    ) -> tuple[_I64, _I64]:
        """Left-padded inputs (B, max_len) and targets (B,) of the leave-one-out split.

        valid: input = training prefix, target = second-to-last item.
        test: input = all but the last item, target = last item."""
    def histories(self, users: ArrayLike, holdout: int = 0) -> tuple[_I64, _I64]:
        """CSR (row offsets (B+1,), items) of the given users' sequences without the last
        ``holdout`` items, for masking seen items in full ranking."""

@final
class TrainSampler:
    """Training batches from each user's training prefix (all but the last two items)."""

    def __new__(
        cls,
        store: SequenceStore,
        max_len: int,
        batch_size: int,
        n_negatives: int = 1,
        seed: int = 0,
        negative_sampling: Literal["uniform", "popularity"] = "uniform",
        last_only: bool = False,
        skip_short: bool = False,
        n_threads: int | None = None,
        bucket_batches: int = 0,
        trim: bool = False,
        windows: bool = False,
    ) -> TrainSampler: ...
    @property
    def n_users(self) -> int:
        """Users that contribute at least one training position."""
    @property
    def n_rows(self) -> int:
        """Rows of an epoch: one per training user, or with ``windows=True`` one per window of
        ``max_len`` positions of each user's training prefix (the last one, the one before it,
        ... down to the first, which may be shorter)."""
    @property
    def n_batches(self) -> int: ...
    def __len__(self) -> int: ...
    def epoch(
        self, epoch: int, rank: int = 0, world_size: int = 1
    ) -> EpochIter:
        """Batches (inputs (B,T), targets (B,T), negatives (B,T,n)) for one epoch.

        The user order is shuffled by (seed, epoch); with world_size > 1 rank r gets batches
        r, r + world_size, ...; the last round is split into world_size nearly equal slices, so
        every user is trained once an epoch across the ranks and every rank takes as many steps
        (a last round of fewer users than ranks is merged with the one before). Negatives are items
        outside the user's training prefix (held-out items are unknown to training), drawn from
        the stream (seed, epoch, user). With ``bucket_batches=k`` > 0, each window of k
        batches of the shuffled order is sorted by training length and the full batches are
        shuffled again (the partial one stays last); with ``trim=True`` every batch is cut to its
        longest row, T <= max_len. A row is a user's last ``max_len`` positions, or with
        ``windows=True`` any window of them (window 0 the last, drawing its negatives from the
        user's stream as above; window w > 0 from the stream of (w, user)), so that every
        training interaction is a target once an epoch."""
    def batch_users(self, epoch: int) -> _I64:
        """The user row of each row of one epoch, in batch order (a user appears once per
        window)."""

@final
class EpochIter(Iterator[tuple[_I64, _I64, _I64]]):
    """The batches of one epoch, built one at a time (GIL released) on ``next``."""

    def __iter__(self) -> EpochIter: ...
    def __next__(self) -> tuple[_I64, _I64, _I64]: ...
    def __len__(self) -> int: ...

def sample_candidates(
    store: SequenceStore,
    users: ArrayLike,
    targets: ArrayLike,
    n_negatives: int = 100,
    seed: int = 0,
    n_threads: int | None = None,
) -> _I64:
    """(B, 1 + n_negatives): column 0 is the target, then distinct items the user never touched."""

def kmeans(
    x: ArrayLike,
    k: int,
    n_iter: int = 20,
    seed: int = 0,
    balanced: bool = False,
    init: Literal["kmeans++", "random"] = "kmeans++",
    n_threads: int | None = None,
) -> tuple[_F32, _I64]:
    """One level of k-means: centroids (k, D) and assignment (N,)."""

def residual_kmeans(
    x: ArrayLike,
    n_levels: int = 3,
    codebook_size: int = 256,
    n_iter: int = 20,
    seed: int = 0,
    normalize_residuals: bool = False,
    balanced: bool = False,
    init: Literal["kmeans++", "random"] = "kmeans++",
    n_threads: int | None = None,
) -> tuple[_I64, _F32]:
    """Residual k-means: codes (N, L) in 0..K-1 and codebooks (L, K, D)."""

def assign_codes(
    x: ArrayLike,
    codebooks: ArrayLike,
    normalize_residuals: bool = False,
    n_threads: int | None = None,
) -> _I64:
    """Greedy nearest-centroid codes (N, L) of x under fixed codebooks (L, K, D)."""

def reconstruction_errors(
    x: ArrayLike,
    codes: ArrayLike,
    codebooks: ArrayLike,
    normalize_residuals: bool = False,
) -> NDArray[np.float64]:
    """Mean squared norm of the residual left after each level, shape (L,)."""

def code_report(codes: ArrayLike, codebook_size: int) -> dict[str, object]:
    """usage (L,), entropy (L, bits), n_unique_tuples, collision_share, largest_collision_group."""

def cooccurrence(
    store: SequenceStore,
    window: int = 3,
    top_k: int = 50,
    min_weight: float = 0.3,
    max_weight: float = 1.0,
    holdout: int = 2,
    n_threads: int | None = None,
) -> tuple[_I64, _I64, NDArray[np.float32], _I64]:
    """PPMI co-occurrence positives as CSR rows indexed by item id 0..n_items.

    Returns (indptr (n_items + 2,), indices, weights in [min_weight, max_weight], counts);
    pairs are items within ``window`` positions of each other in the training prefixes
    (all but the last ``holdout`` items); each row keeps its ``top_k`` by PPMI > 0."""

def csr_matmul(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int64],
    data: ArrayLike,
    dense: ArrayLike,
    n_threads: int | None = None,
    out: NDArray[np.float32] | None = None,
) -> NDArray[np.float64] | NDArray[np.float32]:
    """``A @ dense`` (n, k) for ``A`` (n x m) in CSR form (``indptr`` (n + 1,), ``indices``
    and ``data`` (nnz,)) and ``dense`` (m, k): in float32 when ``dense`` is a float32 numpy
    array, else in float64 (any array-like of integers or real numbers and any memory layout is
    converted first).

    Row r adds ``data[j] * dense[indices[j]]`` over its entries one after another in index
    order, from zero, each product rounded before it is added (no fused multiply-add): the bits
    of that plain loop and of scipy.sparse's CSR product (torch.sparse.mm agrees to rounding:
    on CPUs where MKL sums with fused multiply-adds its last bits differ); a row without
    entries is zero. Computed in column panels of 64 that stay in cache. Rows are shared among
    ``n_threads`` threads (None: all; 1: the calling thread), each row computed by one, so the
    result does not depend on the thread count. With ``out`` (a writable C-contiguous float32
    (n, k) array, ``dense`` float32) each sum is added to ``out`` in place (the bits of
    ``out + A @ dense``) and ``out`` is returned. The GIL is released. Raises ValueError on
    malformed CSR arrays (offsets not starting at 0, decreasing or not ending at nnz; an index
    outside dense's rows), a dense or out of the wrong size, or an out that is not writable or
    not C-contiguous; TypeError on an out (or, with out, a dense) that is not float32."""

def text_scores(
    indptr: NDArray[np.int64],
    indices: NDArray[np.int64],
    data: NDArray[np.float32],
    n_terms: int,
    seq: NDArray[np.int64],
    w: NDArray[np.float32],
    scale: float,
    out: NDArray[np.float32] | None = None,
    n_threads: int | None = None,
) -> NDArray[np.float32]:
    """The text blend's scores ``scale * A @ q`` (rows, B) for the CSR rows ``A`` (rows x
    n_terms) and the users' profiles ``q`` (n_terms, B), column u = ``sum_t w[t] *
    A[seq[u, t]]`` for ``seq`` (B, T) item rows (0: padding, an empty row) and position weights
    ``w`` (T,). Profiles add ``data[j] * w[t]`` in the order (u, t, j) from zero, then are
    scaled; the product is :func:`csr_matmul`'s: the bits of h2rec.blend's scatter-add and of
    the plain loop (torch.sparse.mm to rounding). With ``out`` (writable C-contiguous float32
    (rows, B)) the scores are added to it and it is returned. Raises ValueError on malformed CSR arrays, a ``seq`` value
    outside 0..rows-1, ``w`` of another length than T, or a wrong ``out``."""

def item_scores(items: ArrayLike, states: ArrayLike, out: NDArray[np.float32]) -> NDArray[np.float32]:
    """``out[:] = items @ states.T`` for items (n, d) and states (b, d), float32 (converted),
    ``out`` a writable C-contiguous float32 (n, b) array, returned: every item's score for a
    block of users, in the layout h2rec.evaluate ranks from. One ``gemm``-crate product on the
    calling thread (AVX-512 kernels where the CPU has them); the bits depend on the CPU, not on
    the number of users b (one user is computed as two: the crate's one-column kernel rounds
    otherwise).
    The GIL is released. Raises ValueError on mismatched shapes or a wrong ``out``."""

def linear(x: ArrayLike, w: ArrayLike, bias: ArrayLike | None = None) -> NDArray[np.float32]:
    """``x @ w.T + bias`` for g groups: x (g, m, k), w (g, n, k), bias (g, n) or None,
    float32 (converted); a new (g, m, n) array. Each group one ``gemm``-crate product on the
    calling thread (the bias first, the product added); the crate picks its kernel by size, so
    a row's last bits can depend on m when m is small. The GIL is released. Raises ValueError
    on mismatched shapes."""

def dropout_mask(n: int, p: float, seed: int) -> NDArray[np.float32]:
    """Inverted-dropout keep mask (n,): 65536 / (65536 - t) where kept, 0 where dropped, for
    the threshold t = round(p * 65536) (so about 1 / (1 - p), and exactly the inverse of the
    quantised keep probability: the mask's expectation is 1).

    Element i is decided by a counter-based hash of (seed, i), so the mask depends only on
    (n, p, seed); it is filled on the calling thread (about 2 ms for 1.28M elements).
    Raises ValueError unless 0 <= p < 1 and n >= 0."""
