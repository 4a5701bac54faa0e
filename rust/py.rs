//! Every PyO3 wrapper, the error conversion and the module definition. Arguments are coerced
//! to exact dtypes and checked here, then the kernels run with the GIL released.

use std::sync::Arc;

use numpy::ndarray::{Array2, Array3};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArray3, PyArrayMethods, PyUntypedArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::batch::{SamplerConfig, TrainSampler as RsSampler};
use crate::csr::{Backing, SequenceStore as RsStore};
use crate::error::Error;
use crate::kmeans as km;
use crate::{candidates, cooccur, pool};

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Invalid(m) => PyValueError::new_err(m),
            Error::Invariant(m) => PyRuntimeError::new_err(format!("h2rec internal error: {m}")),
        }
    }
}

fn invariant(m: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("h2rec internal error: {m}"))
}

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Float,
    F64,
}

/// `np.require(obj, dtype, "CA")` (C-contiguous, aligned) after checking the dtype family and the number of
/// dimensions; returns the same object when it already fits (no copy).
fn coerce<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, name: &str, kind: Kind, ndim: usize) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|e| {
        PyTypeError::new_err(format!("{name} must be an array, could not convert it: {e}"))
    })?;
    let dtype = arr.getattr("dtype")?;
    let k: String = dtype.getattr("kind")?.extract()?;
    let ok = match kind {
        Kind::Int => k == "i" || k == "u",
        Kind::Float | Kind::F64 => k == "f" || k == "i" || k == "u",
    };
    if !ok {
        let want = match kind {
            Kind::Int => "integers (int64)",
            Kind::Float => "real numbers (float32)",
            Kind::F64 => "real numbers (float64)",
        };
        return Err(PyTypeError::new_err(format!("{name} must be an array of {want}, got dtype {}", dtype.str()?)));
    }
    let nd: usize = arr.getattr("ndim")?.extract()?;
    if nd != ndim {
        let shape = arr.getattr("shape")?.str()?.to_string();
        return Err(PyValueError::new_err(format!("{name} must be {ndim}-D, got shape {shape}")));
    }
    let target = match kind {
        Kind::Int => "int64",
        Kind::Float => "float32",
        Kind::F64 => "float64",
    };
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", target)?;
    kwargs.set_item("requirements", "CA")?; // C-contiguous and aligned (a copy otherwise)
    np.call_method("require", (arr,), Some(&kwargs))
}

fn int1<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray1<'py, i64>> {
    Ok(coerce(py, obj, name, Kind::Int, 1)?.extract()?)
}
fn int2<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray2<'py, i64>> {
    Ok(coerce(py, obj, name, Kind::Int, 2)?.extract()?)
}
fn f32_2<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray2<'py, f32>> {
    Ok(coerce(py, obj, name, Kind::Float, 2)?.extract()?)
}
fn f32_3<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray3<'py, f32>> {
    Ok(coerce(py, obj, name, Kind::Float, 3)?.extract()?)
}

fn slice<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(a: &'a numpy::PyReadonlyArray<'_, T, D>) -> PyResult<&'a [T]> {
    a.as_slice().map_err(invariant)
}

fn seed_u64(seed: i64) -> PyResult<u64> {
    if seed < 0 {
        return Err(PyValueError::new_err(format!("seed={seed} must be >= 0")));
    }
    Ok(seed as u64)
}

fn threads(n: Option<i64>) -> PyResult<Option<usize>> {
    match n {
        Some(n) if n < 1 => Err(PyValueError::new_err(format!("n_threads={n} must be at least 1 (or None)"))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

fn positive(name: &str, v: i64) -> PyResult<usize> {
    if v < 1 {
        return Err(PyValueError::new_err(format!("{name}={v} must be at least 1")));
    }
    Ok(v as usize)
}

fn vec2<'py>(py: Python<'py>, v: Vec<i64>, rows: usize, cols: usize) -> PyResult<Bound<'py, PyArray2<i64>>> {
    Ok(Array2::from_shape_vec((rows, cols), v).map_err(invariant)?.into_pyarray(py))
}

// ---------------------------------------------------------------------------------------------
// Arrays read in place

/// A numpy array's buffer, kept alive by a reference to the array.
struct NumpyBuf<T> {
    _owner: Py<PyAny>,
    ptr: *const T,
    len: usize,
}

// SAFETY: the buffer is read-only (checked when made) and lives as long as `_owner`; reading
// it needs no GIL.
unsafe impl<T> Send for NumpyBuf<T> {}
unsafe impl<T> Sync for NumpyBuf<T> {}

impl<T> Backing<T> for NumpyBuf<T> {
    fn slice(&self) -> &[T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is the aligned, C-contiguous data of `len` elements of a live array.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The buffer of a 1-D array of exactly `T` that is C-contiguous, aligned and whose memory
/// nothing can write (what `np.load(path, mmap_mode="r")` returns), to read in place; None for
/// anything else, which the caller copies instead.
///
/// A cleared `writeable` flag is not enough: an array that owns its memory, or a view of a
/// writable base, can be made writable again. So the chain of `.base`s must end in an object
/// that is not an array and whose buffer is read-only (a read-only `mmap`, `bytes`).
fn read_only<T: numpy::Element + 'static>(obj: &Bound<'_, PyAny>) -> PyResult<Option<Arc<dyn Backing<T>>>> {
    let Ok(arr) = obj.extract::<Bound<'_, PyArray1<T>>>() else {
        return Ok(None);
    };
    let flags = arr.getattr("flags")?;
    for (flag, want) in [("writeable", false), ("c_contiguous", true), ("aligned", true)] {
        if flags.getattr(flag)?.extract::<bool>()? != want {
            return Ok(None);
        }
    }
    let py = obj.py();
    let ndarray = py.import("numpy")?.getattr("ndarray")?;
    let mut root = arr.getattr("base")?;
    while root.is_instance(&ndarray)? {
        root = root.getattr("base")?;
    }
    if root.is_none() {
        return Ok(None); // the array owns its memory: its flag can be set back
    }
    let readonly = match py.import("builtins")?.getattr("memoryview")?.call1((&root,)) {
        Ok(view) => view.getattr("readonly")?.extract::<bool>()?,
        Err(_) => false, // no buffer protocol: cannot tell
    };
    if !readonly {
        return Ok(None);
    }
    let buf = NumpyBuf { _owner: arr.clone().into_any().unbind(), ptr: arr.data() as *const T, len: arr.len() };
    Ok(Some(Arc::new(buf)))
}

// ---------------------------------------------------------------------------------------------
// SequenceStore

#[pyclass(name = "SequenceStore", module = "h2rec._core", frozen)]
pub struct SequenceStore {
    inner: Arc<RsStore>,
}

#[pymethods]
impl SequenceStore {
    #[new]
    #[pyo3(signature = (offsets, items, n_items=None))]
    fn new(py: Python<'_>, offsets: &Bound<'_, PyAny>, items: &Bound<'_, PyAny>, n_items: Option<i64>) -> PyResult<Self> {
        if let (Some(o), Some(it)) = (read_only::<i64>(offsets)?, read_only::<i32>(items)?) {
            let inner = py.detach(|| RsStore::borrowing(o, it, n_items))?;
            return Ok(SequenceStore { inner: Arc::new(inner) });
        }
        let o = int1(py, offsets, "offsets")?;
        let it = int1(py, items, "items")?;
        let (os, is) = (slice(&o)?, slice(&it)?);
        let inner = py.detach(|| RsStore::new(os, is, n_items))?;
        Ok(SequenceStore { inner: Arc::new(inner) })
    }

    #[staticmethod]
    #[pyo3(signature = (sequences, n_items=None))]
    fn from_sequences(py: Python<'_>, sequences: &Bound<'_, PyAny>, n_items: Option<i64>) -> PyResult<Self> {
        let mut seqs: Vec<Vec<i64>> = Vec::new();
        for (i, s) in sequences.try_iter()?.enumerate() {
            let s = s?;
            let v: Vec<i64> = match s.extract::<Vec<i64>>() {
                Ok(v) => v,
                Err(_) => {
                    let a = int1(py, &s, &format!("sequences[{i}]"))?;
                    slice(&a)?.to_vec()
                }
            };
            seqs.push(v);
        }
        let inner = py.detach(|| RsStore::from_sequences(&seqs, n_items))?;
        Ok(SequenceStore { inner: Arc::new(inner) })
    }

    #[getter]
    fn n_users(&self) -> usize {
        self.inner.n_users()
    }
    #[getter]
    fn n_items(&self) -> u32 {
        self.inner.n_items()
    }
    /// Whether the store reads its arrays in place (read-only int64 offsets and int32 items,
    /// such as ``np.load(..., mmap_mode="r")`` gives) instead of holding a copy.
    #[getter]
    fn borrowed(&self) -> bool {
        self.inner.borrowed()
    }
    #[getter]
    fn n_interactions(&self) -> usize {
        self.inner.n_interactions()
    }
    #[getter]
    fn offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let v: Vec<i64> = self.inner.offsets().iter().map(|&o| o as i64).collect();
        v.into_pyarray(py)
    }
    #[getter]
    fn items<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let v: Vec<i64> = self.inner.items().iter().map(|&o| o as i64).collect();
        v.into_pyarray(py)
    }
    fn __len__(&self) -> usize {
        self.inner.n_users()
    }
    fn __repr__(&self) -> String {
        format!(
            "SequenceStore(n_users={}, n_items={}, n_interactions={})",
            self.inner.n_users(),
            self.inner.n_items(),
            self.inner.n_interactions()
        )
    }
    fn lengths<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let o = self.inner.offsets();
        let v: Vec<i64> = o.windows(2).map(|w| (w[1] - w[0]) as i64).collect();
        v.into_pyarray(py)
    }
    fn sequence<'py>(&self, py: Python<'py>, user: i64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let u = self.inner.check_user("user", 0, user).map_err(|_| {
            PyValueError::new_err(format!("user={user} is not a user row (0..{})", self.inner.n_users()))
        })?;
        let v: Vec<i64> = self.inner.seq(u).iter().map(|&x| x as i64).collect();
        Ok(v.into_pyarray(py))
    }
    #[pyo3(signature = (holdout=0))]
    fn popularity<'py>(&self, py: Python<'py>, holdout: i64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        if holdout < 0 {
            return Err(PyValueError::new_err(format!("holdout={holdout} must be >= 0")));
        }
        let inner = self.inner.clone();
        Ok(py.detach(move || inner.popularity(holdout as usize)).into_pyarray(py))
    }
    #[pyo3(signature = (users, max_len, split))]
    fn eval_inputs<'py>(
        &self,
        py: Python<'py>,
        users: &Bound<'py, PyAny>,
        max_len: i64,
        split: &str,
    ) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray1<i64>>)> {
        let test = match split {
            "test" => true,
            "valid" => false,
            other => return Err(PyValueError::new_err(format!("split='{other}' must be 'valid' or 'test'"))),
        };
        let t = positive("max_len", max_len)?;
        let u = int1(py, users, "users")?;
        let us = slice(&u)?;
        let (inp, tgt) = py.detach(|| self.inner.eval_inputs(us, t, test))?;
        Ok((vec2(py, inp, us.len(), t)?, tgt.into_pyarray(py)))
    }
    #[pyo3(signature = (users, holdout=0))]
    fn histories<'py>(
        &self,
        py: Python<'py>,
        users: &Bound<'py, PyAny>,
        holdout: i64,
    ) -> PyResult<(Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>)> {
        if holdout < 0 {
            return Err(PyValueError::new_err(format!("holdout={holdout} must be >= 0")));
        }
        let u = int1(py, users, "users")?;
        let us = slice(&u)?;
        let (p, it) = py.detach(|| self.inner.histories(us, holdout as usize))?;
        Ok((p.into_pyarray(py), it.into_pyarray(py)))
    }
}

// ---------------------------------------------------------------------------------------------
// TrainSampler

#[pyclass(name = "TrainSampler", module = "h2rec._core", frozen)]
pub struct TrainSampler {
    store: Arc<RsStore>,
    inner: Arc<RsSampler>,
    n_threads: Option<usize>,
}

#[pymethods]
impl TrainSampler {
    #[new]
    #[pyo3(signature = (store, max_len, batch_size, n_negatives=1, seed=0, negative_sampling="uniform",
                        last_only=false, skip_short=false, n_threads=None, bucket_batches=0, trim=false,
                        windows=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        store: &Bound<'_, SequenceStore>,
        max_len: i64,
        batch_size: i64,
        n_negatives: i64,
        seed: i64,
        negative_sampling: &str,
        last_only: bool,
        skip_short: bool,
        n_threads: Option<i64>,
        bucket_batches: i64,
        trim: bool,
        windows: bool,
    ) -> PyResult<Self> {
        if bucket_batches < 0 {
            return Err(PyValueError::new_err(format!("bucket_batches={bucket_batches} must be >= 0")));
        }
        let popularity = match negative_sampling {
            "uniform" => false,
            "popularity" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "negative_sampling='{other}' must be 'uniform' or 'popularity'"
                )))
            }
        };
        let cfg = SamplerConfig {
            max_len: positive("max_len", max_len)?,
            batch_size: positive("batch_size", batch_size)?,
            n_negatives: positive("n_negatives", n_negatives)?,
            seed: seed_u64(seed)?,
            popularity,
            last_only,
            skip_short,
            bucket_batches: bucket_batches as usize,
            trim,
            windows,
        };
        let st = store.get().inner.clone();
        let n_threads = threads(n_threads)?;
        let inner = py.detach(|| RsSampler::new(&st, cfg))?;
        Ok(TrainSampler { store: st, inner: Arc::new(inner), n_threads })
    }

    #[getter]
    fn n_users(&self) -> usize {
        self.inner.n_users()
    }
    /// Rows of an epoch: one per training user, or with ``windows`` one per window.
    #[getter]
    fn n_rows(&self) -> usize {
        self.inner.n_rows()
    }
    #[getter]
    fn n_batches(&self) -> usize {
        self.inner.n_batches()
    }
    fn __len__(&self) -> usize {
        self.inner.n_batches()
    }

    #[pyo3(signature = (epoch, rank=0, world_size=1))]
    fn epoch(&self, py: Python<'_>, epoch: i64, rank: i64, world_size: i64) -> PyResult<EpochIter> {
        if epoch < 0 {
            return Err(PyValueError::new_err(format!("epoch={epoch} must be >= 0")));
        }
        if world_size < 1 || rank < 0 || rank >= world_size {
            return Err(PyValueError::new_err(format!(
                "rank={rank} must be in 0..world_size and world_size={world_size} at least 1"
            )));
        }
        let batches = self.inner.rank_ranges(rank as usize, world_size as usize)?;
        let inner = self.inner.clone();
        let store = self.store.clone();
        let perm = py.detach(move || inner.permutation(&store, epoch as u64));
        Ok(EpochIter {
            store: self.store.clone(),
            sampler: self.inner.clone(),
            perm: Arc::new(perm),
            epoch: epoch as u64,
            batches,
            pos: std::sync::atomic::AtomicUsize::new(0),
            n_threads: self.n_threads,
        })
    }

    fn batch_users<'py>(&self, py: Python<'py>, epoch: i64) -> PyResult<Bound<'py, PyArray1<i64>>> {
        if epoch < 0 {
            return Err(PyValueError::new_err(format!("epoch={epoch} must be >= 0")));
        }
        let perm = self.inner.permutation(&self.store, epoch as u64);
        let p: Vec<i64> = perm.into_iter().map(|r| self.inner.user_of(r) as i64).collect();
        Ok(p.into_pyarray(py))
    }
}

/// The batches of one epoch, built one at a time on `next`.
#[pyclass(module = "h2rec._core", frozen)]
pub struct EpochIter {
    store: Arc<RsStore>,
    sampler: Arc<RsSampler>,
    perm: Arc<Vec<u32>>,
    epoch: u64,
    batches: Vec<(usize, usize)>,
    pos: std::sync::atomic::AtomicUsize,
    n_threads: Option<usize>,
}

type BatchArrays<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyArray2<i64>>, Bound<'py, PyArray3<i64>>);

#[pymethods]
impl EpochIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }
    fn __len__(&self) -> usize {
        self.batches.len()
    }
    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<BatchArrays<'py>>> {
        use std::sync::atomic::Ordering;
        let i = self.pos.fetch_add(1, Ordering::SeqCst);
        let Some(&(start, end)) = self.batches.get(i) else {
            self.pos.store(self.batches.len(), Ordering::SeqCst);
            return Ok(None);
        };
        let (store, sampler, perm, epoch) = (&self.store, &self.sampler, &self.perm, self.epoch);
        let batch = py.detach(|| pool::run(self.n_threads, || sampler.batch_rows(store, perm, epoch, start, end)))?;
        let (t, n) = (batch.width, self.sampler.config().n_negatives);
        let inputs = vec2(py, batch.inputs, batch.rows, t)?;
        let targets = vec2(py, batch.targets, batch.rows, t)?;
        let negs = Array3::from_shape_vec((batch.rows, t, n), batch.negatives).map_err(invariant)?.into_pyarray(py);
        Ok(Some((inputs, targets, negs)))
    }
}

// ---------------------------------------------------------------------------------------------
// functions

#[pyfunction]
#[pyo3(signature = (store, users, targets, n_negatives=100, seed=0, n_threads=None))]
fn sample_candidates<'py>(
    py: Python<'py>,
    store: &Bound<'py, SequenceStore>,
    users: &Bound<'py, PyAny>,
    targets: &Bound<'py, PyAny>,
    n_negatives: i64,
    seed: i64,
    n_threads: Option<i64>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let n = positive("n_negatives", n_negatives)?;
    let seed = seed_u64(seed)?;
    let nt = threads(n_threads)?;
    let u = int1(py, users, "users")?;
    let t = int1(py, targets, "targets")?;
    let (us, ts) = (slice(&u)?, slice(&t)?);
    let st = store.get().inner.clone();
    let out = py.detach(|| pool::run(nt, || candidates::sample_candidates(&st, us, ts, n, seed)))??;
    vec2(py, out, us.len(), n + 1)
}

#[pyfunction]
#[pyo3(signature = (x, k, n_iter=20, seed=0, balanced=false, init="kmeans++", n_threads=None))]
#[allow(clippy::too_many_arguments)]
fn kmeans<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    k: i64,
    n_iter: i64,
    seed: i64,
    balanced: bool,
    init: &str,
    n_threads: Option<i64>,
) -> PyResult<(Bound<'py, PyArray2<f32>>, Bound<'py, PyArray1<i64>>)> {
    let x = f32_2(py, x, "x")?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let o = km::KMeansOpts {
        k: positive("k", k)?,
        n_iter: non_negative("n_iter", n_iter)?,
        seed: seed_u64(seed)?,
        balanced,
        init: parse_init(init)?,
    };
    let nt = threads(n_threads)?;
    let xs = slice(&x)?;
    let (c, a) = py.detach(|| pool::run(nt, || km::kmeans(xs, n, d, &o)))??;
    let c = Array2::from_shape_vec((o.k, d), c).map_err(invariant)?.into_pyarray(py);
    let a: Vec<i64> = a.into_iter().map(|v| v as i64).collect();
    Ok((c, a.into_pyarray(py)))
}

fn parse_init(init: &str) -> PyResult<km::Init> {
    match init {
        "kmeans++" => Ok(km::Init::KMeansPlusPlus),
        "random" => Ok(km::Init::Random),
        other => Err(PyValueError::new_err(format!("init='{other}' must be 'kmeans++' or 'random'"))),
    }
}

fn non_negative(name: &str, v: i64) -> PyResult<usize> {
    if v < 0 {
        return Err(PyValueError::new_err(format!("{name}={v} must be >= 0")));
    }
    Ok(v as usize)
}

#[pyfunction]
#[pyo3(signature = (x, n_levels=3, codebook_size=256, n_iter=20, seed=0, normalize_residuals=false,
                    balanced=false, init="kmeans++", n_threads=None))]
#[allow(clippy::too_many_arguments)]
fn residual_kmeans<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    n_levels: i64,
    codebook_size: i64,
    n_iter: i64,
    seed: i64,
    normalize_residuals: bool,
    balanced: bool,
    init: &str,
    n_threads: Option<i64>,
) -> PyResult<(Bound<'py, PyArray2<i64>>, Bound<'py, PyArray3<f32>>)> {
    let x = f32_2(py, x, "x")?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let o = km::RqOpts {
        n_levels: positive("n_levels", n_levels)?,
        k: positive("codebook_size", codebook_size)?,
        n_iter: non_negative("n_iter", n_iter)?,
        seed: seed_u64(seed)?,
        normalize: normalize_residuals,
        balanced,
        init: parse_init(init)?,
    };
    let nt = threads(n_threads)?;
    let xs = slice(&x)?;
    let (codes, books) = py.detach(|| pool::run(nt, || km::residual_kmeans(xs, n, d, &o)))??;
    let codes = vec2(py, codes, n, o.n_levels)?;
    let books = Array3::from_shape_vec((o.n_levels, o.k, d), books).map_err(invariant)?.into_pyarray(py);
    Ok((codes, books))
}

#[pyfunction]
#[pyo3(signature = (x, codebooks, normalize_residuals=false, n_threads=None))]
fn assign_codes<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    codebooks: &Bound<'py, PyAny>,
    normalize_residuals: bool,
    n_threads: Option<i64>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let x = f32_2(py, x, "x")?;
    let b = f32_3(py, codebooks, "codebooks")?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let (l, k, bd) = (b.shape()[0], b.shape()[1], b.shape()[2]);
    if bd != d {
        return Err(PyValueError::new_err(format!("codebooks dimension {bd} does not match x dimension {d}")));
    }
    let nt = threads(n_threads)?;
    let (xs, bs) = (slice(&x)?, slice(&b)?);
    let codes = py.detach(|| pool::run(nt, || km::assign_codes(xs, n, d, bs, l, k, normalize_residuals)))??;
    vec2(py, codes, n, l)
}

#[pyfunction]
#[pyo3(signature = (x, codes, codebooks, normalize_residuals=false))]
fn reconstruction_errors<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    codes: &Bound<'py, PyAny>,
    codebooks: &Bound<'py, PyAny>,
    normalize_residuals: bool,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let x = f32_2(py, x, "x")?;
    let c = int2(py, codes, "codes")?;
    let b = f32_3(py, codebooks, "codebooks")?;
    let (n, d) = (x.shape()[0], x.shape()[1]);
    let (l, k, bd) = (b.shape()[0], b.shape()[1], b.shape()[2]);
    if bd != d {
        return Err(PyValueError::new_err(format!("codebooks dimension {bd} does not match x dimension {d}")));
    }
    if c.shape() != [n, l] {
        return Err(PyValueError::new_err(format!(
            "codes has shape {:?}, expected ({n}, {l}) for x with {n} rows and {l} codebook levels",
            c.shape()
        )));
    }
    let (xs, cs, bs) = (slice(&x)?, slice(&c)?, slice(&b)?);
    let e = py.detach(|| km::reconstruction_errors(xs, n, d, cs, bs, l, k, normalize_residuals))?;
    Ok(e.into_pyarray(py))
}

#[pyfunction]
#[pyo3(signature = (codes, codebook_size))]
fn code_report<'py>(py: Python<'py>, codes: &Bound<'py, PyAny>, codebook_size: i64) -> PyResult<Bound<'py, PyDict>> {
    let c = int2(py, codes, "codes")?;
    let (n, l) = (c.shape()[0], c.shape()[1]);
    let k = positive("codebook_size", codebook_size)?;
    let cs = slice(&c)?;
    let r = py.detach(|| km::code_report(cs, n, l, k))?;
    let d = PyDict::new(py);
    d.set_item("n_items", n)?;
    d.set_item("n_levels", l)?;
    d.set_item("codebook_size", k)?;
    d.set_item("usage", PyList::new(py, &r.usage)?)?;
    d.set_item("entropy", PyList::new(py, &r.entropy_bits)?)?;
    d.set_item("n_unique_tuples", r.n_unique_tuples)?;
    d.set_item("collision_share", r.collision_share)?;
    d.set_item("largest_collision_group", r.largest_collision_group)?;
    Ok(d)
}

type Csr<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<f32>>, Bound<'py, PyArray1<i64>>);

#[pyfunction]
#[pyo3(signature = (store, window=3, top_k=50, min_weight=0.3, max_weight=1.0, holdout=2, n_threads=None))]
#[allow(clippy::too_many_arguments)]
fn cooccurrence<'py>(
    py: Python<'py>,
    store: &Bound<'py, SequenceStore>,
    window: i64,
    top_k: i64,
    min_weight: f32,
    max_weight: f32,
    holdout: i64,
    n_threads: Option<i64>,
) -> PyResult<Csr<'py>> {
    let o = cooccur::CooccurOpts {
        window: positive("window", window)?,
        top_k: positive("top_k", top_k)?,
        min_weight,
        max_weight,
        holdout: non_negative("holdout", holdout)?,
    };
    let nt = threads(n_threads)?;
    let st = store.get().inner.clone();
    let c = py.detach(|| pool::run(nt, || cooccur::cooccurrence(&st, &o)))??;
    Ok((c.indptr.into_pyarray(py), c.indices.into_pyarray(py), c.weights.into_pyarray(py), c.counts.into_pyarray(py)))
}

/// Inverted-dropout keep mask of n elements for drop probability p, from a counter-based hash
/// of (seed, element), filled on the calling thread.
#[pyfunction]
#[pyo3(signature = (n, p, seed))]
fn dropout_mask<'py>(py: Python<'py>, n: i64, p: f64, seed: u64) -> PyResult<Bound<'py, PyArray1<f32>>> {
    if n < 0 {
        return Err(PyValueError::new_err(format!("n={n} must be >= 0")));
    }
    crate::dropout::threshold(p)?;
    let mut out = vec![0.0f32; n as usize];
    py.detach(|| crate::dropout::fill_mask(&mut out, p, seed))?;
    Ok(out.into_pyarray(py))
}

/// `write(out)` into `target`, a writable C-contiguous float32 (rows, cols) numpy array, with
/// the GIL released; returns the array, or a TypeError / ValueError saying what `target` is not.
fn write_out<'py>(
    py: Python<'py>,
    target: &Bound<'py, PyAny>,
    rows: usize,
    cols: usize,
    write: impl FnOnce(&mut [f32]) -> crate::error::Result<()> + Send,
) -> PyResult<Bound<'py, PyAny>> {
    let Ok(arr) = target.extract::<Bound<'py, PyArray2<f32>>>() else {
        return Err(PyTypeError::new_err("out must be a float32 2-D numpy array"));
    };
    if arr.shape() != [rows, cols] {
        return Err(PyValueError::new_err(format!("out has shape {:?}, expected ({rows}, {cols})", arr.shape())));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err("out must be C-contiguous"));
    }
    {
        let mut rw = arr.try_readwrite().map_err(|e| PyValueError::new_err(format!("out is not writable: {e}")))?;
        let o = rw.as_slice_mut().map_err(|_| PyValueError::new_err("out must be C-contiguous"))?;
        py.detach(|| write(o))?;
    }
    Ok(arr.into_any())
}

/// `A @ dense` for a CSR matrix A (see `crate::spmm::csr_matmul`): in float32 when `dense` is a
/// float32 array, in float64 otherwise; every argument goes through `coerce`, so any
/// array-like of the right kind and dimensions is accepted. With `out` (a writable, C-contiguous
/// float32 (n, k) array; `dense` then float32 too) the product is added to it in place
/// (`crate::spmm::csr_matmul_add`) and `out` is returned.
#[pyfunction]
#[pyo3(signature = (indptr, indices, data, dense, n_threads=None, out=None))]
fn csr_matmul<'py>(
    py: Python<'py>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    dense: &Bound<'py, PyAny>,
    n_threads: Option<i64>,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let indptr = int1(py, indptr, "indptr")?;
    let indices = int1(py, indices, "indices")?;
    let t = threads(n_threads)?;
    let n = indptr.len().saturating_sub(1);
    let single = dense.extract::<Bound<'_, PyArray2<f32>>>().is_ok();
    if let Some(target) = out {
        if !single {
            return Err(PyTypeError::new_err("with out, dense must be a float32 2-D numpy array"));
        }
        let data: PyReadonlyArray1<'py, f32> = coerce(py, data, "data", Kind::Float, 1)?.extract()?;
        let dense: PyReadonlyArray2<'py, f32> = f32_2(py, dense, "dense")?;
        let (m, k) = (dense.shape()[0], dense.shape()[1]);
        let (p, i, d, x) = (slice(&indptr)?, slice(&indices)?, slice(&data)?, slice(&dense)?);
        return write_out(py, &target, n, k, |o| crate::spmm::csr_matmul_add(p, i, d, x, m, k, o, t));
    }
    if single {
        let data: PyReadonlyArray1<'py, f32> = coerce(py, data, "data", Kind::Float, 1)?.extract()?;
        let dense: PyReadonlyArray2<'py, f32> = f32_2(py, dense, "dense")?;
        let (m, k) = (dense.shape()[0], dense.shape()[1]);
        let (p, i, d, x) = (slice(&indptr)?, slice(&indices)?, slice(&data)?, slice(&dense)?);
        let out = py.detach(|| crate::spmm::csr_matmul(p, i, d, x, m, k, t))?;
        let arr = numpy::ndarray::Array2::from_shape_vec((n, k), out).map_err(invariant)?;
        return Ok(arr.into_pyarray(py).into_any());
    }
    let data: PyReadonlyArray1<'py, f64> = coerce(py, data, "data", Kind::F64, 1)?.extract()?;
    let dense: PyReadonlyArray2<'py, f64> = coerce(py, dense, "dense", Kind::F64, 2)?.extract()?;
    let (m, k) = (dense.shape()[0], dense.shape()[1]);
    let (p, i, d, x) = (slice(&indptr)?, slice(&indices)?, slice(&data)?, slice(&dense)?);
    let out = py.detach(|| crate::spmm::csr_matmul(p, i, d, x, m, k, t))?;
    Ok(numpy::ndarray::Array2::from_shape_vec((n, k), out).map_err(invariant)?.into_pyarray(py).into_any())
}

/// The text blend's scores (see `crate::spmm::text_scores`): CSR rows (`indptr`, `indices`,
/// float32 `data`) of `n_terms` terms, `seq` (b, t) int64 item rows, `w` (t,) float32 position
/// weights, `scale`. With `out` (a writable, C-contiguous float32 (rows, b) array) the scores
/// are added to it and `out` is returned; without, a new (rows, b) array. The GIL is released.
#[pyfunction]
#[pyo3(signature = (indptr, indices, data, n_terms, seq, w, scale, out=None, n_threads=None))]
#[allow(clippy::too_many_arguments)]
fn text_scores<'py>(
    py: Python<'py>,
    indptr: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    n_terms: i64,
    seq: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    scale: f32,
    out: Option<Bound<'py, PyAny>>,
    n_threads: Option<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let indptr = int1(py, indptr, "indptr")?;
    let indices = int1(py, indices, "indices")?;
    let data: PyReadonlyArray1<'py, f32> = coerce(py, data, "data", Kind::Float, 1)?.extract()?;
    let w: PyReadonlyArray1<'py, f32> = coerce(py, w, "w", Kind::Float, 1)?.extract()?;
    let seq = int2(py, seq, "seq")?;
    if n_terms < 0 {
        return Err(PyValueError::new_err(format!("n_terms={n_terms} must be >= 0")));
    }
    let t = threads(n_threads)?;
    let (b, len) = (seq.shape()[0], seq.shape()[1]);
    let rows = indptr.len().saturating_sub(1);
    let (p, i, d, s, wv) = (slice(&indptr)?, slice(&indices)?, slice(&data)?, slice(&seq)?, slice(&w)?);
    let nt = n_terms as usize;
    let h = crate::spmm::Histories { seq: s, b, t: len, w: wv, scale };
    if let Some(target) = out {
        return write_out(py, &target, rows, b, |o| {
            crate::spmm::text_scores(p, i, d, nt, &h, o, true, t)
        });
    }
    let mut o: Vec<f32> = crate::error::zeros(rows, b, "the scores")?;
    py.detach(|| crate::spmm::text_scores(p, i, d, nt, &h, &mut o, false, t))?;
    Ok(numpy::ndarray::Array2::from_shape_vec((rows, b), o).map_err(invariant)?.into_pyarray(py).into_any())
}

/// `x @ w.T + bias` for g groups (see `crate::score::linear`): x (g, m, k), w (g, n, k) and
/// bias (g, n) or None, float32 (any array-like is converted); returns a new (g, m, n) array.
/// The GIL is released.
#[pyfunction]
#[pyo3(signature = (x, w, bias=None))]
fn linear<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    w: &Bound<'py, PyAny>,
    bias: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyArray3<f32>>> {
    let x = f32_3(py, x, "x")?;
    let w = f32_3(py, w, "w")?;
    let (g, m, k) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let (g2, n, k2) = (w.shape()[0], w.shape()[1], w.shape()[2]);
    if g2 != g || k2 != k {
        return Err(PyValueError::new_err(format!("w has shape ({g2}, {n}, {k2}), x ({g}, {m}, {k})")));
    }
    let b = match bias {
        Some(b) => Some(f32_2(py, b, "bias")?),
        None => None,
    };
    if let Some(b) = &b {
        if b.shape() != [g, n] {
            return Err(PyValueError::new_err(format!("bias has shape {:?}, expected ({g}, {n})", b.shape())));
        }
    }
    let Some(rows) = g.checked_mul(m) else {
        return Err(PyValueError::new_err(format!("x of shape ({g}, {m}, {k}) is too large")));
    };
    let mut out: Vec<f32> = crate::error::zeros(rows, n, "the output")?;
    let (xs, ws) = (slice(&x)?, slice(&w)?);
    let bs = match &b {
        Some(b) => Some(slice(b)?),
        None => None,
    };
    py.detach(|| crate::score::linear(xs, g, m, k, ws, n, bs, &mut out))?;
    Ok(Array3::from_shape_vec((g, m, n), out).map_err(invariant)?.into_pyarray(py))
}

/// `out[:] = items @ states.T` (see `crate::score::item_scores`): items (n, d) and states (b, d)
/// float32 (any array-like is converted), out a writable C-contiguous float32 (n, b) array,
/// returned. The GIL is released.
#[pyfunction]
fn item_scores<'py>(
    py: Python<'py>,
    items: &Bound<'py, PyAny>,
    states: &Bound<'py, PyAny>,
    out: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let items = f32_2(py, items, "items")?;
    let states = f32_2(py, states, "states")?;
    let (n, d) = (items.shape()[0], items.shape()[1]);
    let (b, d2) = (states.shape()[0], states.shape()[1]);
    if d2 != d {
        return Err(PyValueError::new_err(format!("states has {d2} columns, items {d}")));
    }
    let (x, s) = (slice(&items)?, slice(&states)?);
    write_out(py, &out, n, b, |o| crate::score::item_scores(x, n, s, b, d, o))
}

/// The instruction set of the vector kernels (k-means distances and norms, centroid sums):
/// "avx2" or "scalar", decided at import from the CPU and H2REC_SIMD.
#[pyfunction]
fn simd_level() -> &'static str {
    crate::simd::level().name()
}

/// The instruction set the `gemm` crate runs the k-means distance GEMM with: "avx512", "avx2"
/// or "scalar", from the CPU alone.
#[pyfunction]
fn gemm_simd_level() -> &'static str {
    crate::simd::gemm_level()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("build_profile", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    // A mistyped H2REC_SIMD fails the import rather than being ignored; a valid one fixes the
    // kernels' level now, so that later changes to the environment do not matter.
    crate::simd::env_request().map_err(PyValueError::new_err)?;
    crate::simd::level();
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(gemm_simd_level, m)?)?;
    m.add_class::<SequenceStore>()?;
    m.add_class::<TrainSampler>()?;
    m.add_class::<EpochIter>()?;
    m.add_function(wrap_pyfunction!(sample_candidates, m)?)?;
    m.add_function(wrap_pyfunction!(kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(residual_kmeans, m)?)?;
    m.add_function(wrap_pyfunction!(assign_codes, m)?)?;
    m.add_function(wrap_pyfunction!(reconstruction_errors, m)?)?;
    m.add_function(wrap_pyfunction!(code_report, m)?)?;
    m.add_function(wrap_pyfunction!(cooccurrence, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_mask, m)?)?;
    m.add_function(wrap_pyfunction!(csr_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(item_scores, m)?)?;
    m.add_function(wrap_pyfunction!(linear, m)?)?;
    m.add_function(wrap_pyfunction!(text_scores, m)?)?;
    Ok(())
}
