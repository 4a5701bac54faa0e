//! Sparse (CSR) times dense, in f64 (the products of the TF-IDF embedding's randomized SVD)
//! or f32 (the text blend's scores of every item for a batch of users).

use rayon::prelude::*;

use crate::ensure;
use crate::error::Result;

/// Rows of the output one task computes (a few hundred KB of output at k = 266).
const ROWS_PER_TASK: usize = 128;

/// Columns of a panel: the output is computed in panels of this many columns, each panel of a
/// row summed in a local accumulator (registers) before it is stored, and the panel of the
/// dense rows the entries read (m x 64 values: 1.4 MB for the text blend's 5,540 Beauty
/// terms) stays in cache instead of streaming whole rows from memory for every entry. Each
/// output value is still the same sum.
const PANEL: usize = 64;

/// The element types of [`csr_matmul`].
pub trait Real: Copy + Default + Send + Sync + std::ops::Mul<Output = Self> + std::ops::AddAssign {}
impl Real for f32 {}
impl Real for f64 {}

/// `A @ X` for `A` (n × m) in CSR form (`indptr` (n + 1), `indices` (nnz), `data` (nnz)) and
/// `X` (m × k) row-major, in `T` (f32 or f64); returns the (n × k) product, row-major.
///
/// Output row r is `sum_j data[j] * X[indices[j]]` over j in `indptr[r]..indptr[r + 1]`, added
/// one after another in j order, each product rounded before it is added (no fused
/// multiply-add): the bits of the plain loop from zero (and of scipy.sparse's CSR product). A
/// row without entries is zero. Each row is computed by one thread, so the result does not
/// depend on `n_threads` (`None`: the global pool; `Some(1)`: the calling thread); the AVX2
/// body (when the CPU has it) computes the same products and sums lane by lane, so the bits do
/// not depend on it either.
pub fn csr_matmul<T: Real>(
    indptr: &[i64],
    indices: &[i64],
    data: &[T],
    x: &[T],
    m: usize,
    k: usize,
    n_threads: Option<usize>,
) -> Result<Vec<T>> {
    let n = check(indptr, indices, data, x, m, k)?;
    let mut out: Vec<T> = crate::error::zeros(n, k, "the output")?;
    products(indptr, indices, data, x, k, &mut out, false, n_threads)?;
    Ok(out)
}

/// `out += A @ X` in place, `out` (n × k) row-major: each value gets the sum [`csr_matmul`]
/// computes (from zero, in j order) added once, so the bits are those of adding the product
/// afterwards (`out + (A @ X)`), without the (n × k) product in memory.
#[allow(clippy::too_many_arguments)]
pub fn csr_matmul_add<T: Real>(
    indptr: &[i64],
    indices: &[i64],
    data: &[T],
    x: &[T],
    m: usize,
    k: usize,
    out: &mut [T],
    n_threads: Option<usize>,
) -> Result<()> {
    let n = check(indptr, indices, data, x, m, k)?;
    ensure!(Some(out.len()) == n.checked_mul(k), "out has {} values, expected {n} x {k}", out.len());
    products(indptr, indices, data, x, k, out, true, n_threads)
}

/// The users of a text-blend product: `seq` (b × t, row-major) item rows (0: padding, whose
/// row is empty), `w` (t,) the weight of each position, `scale` a factor on the profiles.
pub struct Histories<'a> {
    pub seq: &'a [i64],
    pub b: usize,
    pub t: usize,
    pub w: &'a [f32],
    pub scale: f32,
}

/// The text blend's user profiles: `qt` (n_terms × b, row-major), column u =
/// `scale * sum_t w[t] * A[seq[u, t]]` for `A` (rows × n_terms) in CSR form. Each entry adds
/// `data[j] * w[t]` (rounded) in the order (u, t, j), from zero, then the sums are multiplied
/// by `scale`: the bits of the scatter-add it replaces (`h2rec.blend.TextScores`).
pub fn profiles(indptr: &[i64], indices: &[i64], data: &[f32], n_terms: usize, h: &Histories) -> Result<Vec<f32>> {
    let rows = check_csr(indptr, indices, data.len(), n_terms, "terms")?;
    let (seq, b, t, w) = (h.seq, h.b, h.t, h.w);
    ensure!(Some(seq.len()) == b.checked_mul(t), "seq has {} values, expected {b} x {t}", seq.len());
    ensure!(w.len() == t, "w has {} weights for {t} positions", w.len());
    if let Some(p) = seq.iter().position(|&v| v < 0 || v as usize >= rows) {
        return Err(crate::invalid!("seq[{}, {}]={} is not an item row (0..{rows})", p / t.max(1), p % t.max(1), seq[p]));
    }
    let mut qt: Vec<f32> = crate::error::zeros(n_terms, b, "profiles")?;
    for u in 0..b {
        for (pos, &wt) in w.iter().enumerate() {
            let item = seq[u * t + pos] as usize;
            for j in indptr[item] as usize..indptr[item + 1] as usize {
                qt[indices[j] as usize * b + u] += data[j] * wt;
            }
        }
    }
    for v in qt.iter_mut() {
        *v *= h.scale;
    }
    Ok(qt)
}

/// The text blend's scores of every row of `A` for the users `h`: `out` (rows × b, row-major)
/// gets `A @ profiles(..)` (see [`profiles`]; each value the sum [`csr_matmul`] computes)
/// stored, or (`add`) added to what it holds. One check of the arrays, no (rows × b) product in
/// memory beside `out`.
#[allow(clippy::too_many_arguments)]
pub fn text_scores(
    indptr: &[i64],
    indices: &[i64],
    data: &[f32],
    n_terms: usize,
    h: &Histories,
    out: &mut [f32],
    add: bool,
    n_threads: Option<usize>,
) -> Result<()> {
    let qt = profiles(indptr, indices, data, n_terms, h)?;
    let rows = indptr.len() - 1;
    ensure!(Some(out.len()) == rows.checked_mul(h.b), "out has {} values, expected {rows} x {}", out.len(), h.b);
    products(indptr, indices, data, &qt, h.b, out, add, n_threads)
}

/// Checks the CSR arrays and the dense size; the number of rows n.
fn check<T: Real>(indptr: &[i64], indices: &[i64], data: &[T], x: &[T], m: usize, k: usize) -> Result<usize> {
    let n = check_csr(indptr, indices, data.len(), m, "rows of dense")?;
    let size = m.checked_mul(k).ok_or_else(|| crate::invalid!("dense of {m} x {k} is too large"))?;
    ensure!(x.len() == size, "dense has {} values, expected {m} x {k}", x.len());
    Ok(n)
}

/// Checks CSR arrays of a matrix with `n_cols` columns, named `cols` in errors (offsets from 0
/// to nnz, never decreasing; column ids inside 0..n_cols; as many values as ids); the number
/// of rows.
fn check_csr(indptr: &[i64], indices: &[i64], n_values: usize, n_cols: usize, cols: &str) -> Result<usize> {
    ensure!(!indptr.is_empty(), "indptr is empty: a CSR matrix of n rows has n + 1 offsets");
    let n = indptr.len() - 1;
    let nnz = indices.len();
    ensure!(n_values == nnz, "data has {n_values} values for {nnz} indices");
    ensure!(indptr[0] == 0, "indptr[0]={} must be 0", indptr[0]);
    ensure!(indptr[n] as usize == nnz && indptr[n] >= 0, "indptr[{n}]={} must be nnz={nnz}", indptr[n]);
    if let Some(r) = (0..n).find(|&r| indptr[r + 1] < indptr[r]) {
        return Err(crate::invalid!("indptr decreases at row {r}: {} then {}", indptr[r], indptr[r + 1]));
    }
    if let Some(j) = indices.iter().position(|&c| c < 0 || c as usize >= n_cols) {
        return Err(crate::invalid!("indices[{j}]={} is outside the {n_cols} {cols}", indices[j]));
    }
    Ok(n)
}

/// The rows of `out` (n × k): stored (`add` false) or added to (`add` true), tasks of
/// ROWS_PER_TASK rows shared among `n_threads`.
#[allow(clippy::too_many_arguments)]
fn products<T: Real>(
    indptr: &[i64],
    indices: &[i64],
    data: &[T],
    x: &[T],
    k: usize,
    out: &mut [T],
    add: bool,
    n_threads: Option<usize>,
) -> Result<()> {
    if k == 0 || out.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::simd::level() == crate::simd::Level::Avx2;
    let task = |(t, block): (usize, &mut [T])| {
        let first = t * ROWS_PER_TASK;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 (`simd::level` never exceeds what it detects).
            return unsafe { rows_avx2(block, first, k, indptr, indices, data, x, add) };
        }
        rows(block, first, k, indptr, indices, data, x, add);
    };
    let chunk = ROWS_PER_TASK.saturating_mul(k);
    if n_threads == Some(1) {
        // on the calling thread: callers running batches side by side (evaluation's workers)
        // would otherwise queue on the one thread of a shared one-thread pool
        out.chunks_mut(chunk).enumerate().for_each(task);
        Ok(())
    } else {
        crate::pool::run(n_threads, || out.par_chunks_mut(chunk).enumerate().for_each(task))
    }
}

/// The output rows `first..` of `block` (whole rows of k values), one column panel at a time:
/// each panel's sums from zero, stored or (`add`) added.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows<T: Real>(block: &mut [T], first: usize, k: usize, indptr: &[i64], indices: &[i64], data: &[T], x: &[T], add: bool) {
    let n_rows = block.len() / k;
    let mut c0 = 0;
    while c0 < k {
        let w = PANEL.min(k - c0);
        for i in 0..n_rows {
            let r = first + i;
            let mut acc = [T::default(); PANEL];
            if w == PANEL {
                for j in indptr[r] as usize..indptr[r + 1] as usize {
                    let a = data[j];
                    let start = indices[j] as usize * k + c0;
                    for (o, &v) in acc.iter_mut().zip(&x[start..start + PANEL]) {
                        *o += a * v;
                    }
                }
            } else {
                for j in indptr[r] as usize..indptr[r + 1] as usize {
                    let a = data[j];
                    let start = indices[j] as usize * k + c0;
                    for (o, &v) in acc[..w].iter_mut().zip(&x[start..start + w]) {
                        *o += a * v;
                    }
                }
            }
            let dst = &mut block[i * k + c0..i * k + c0 + w];
            if add {
                for (o, &v) in dst.iter_mut().zip(&acc[..w]) {
                    *o += v;
                }
            } else {
                dst.copy_from_slice(&acc[..w]);
            }
        }
        c0 += w;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2<T: Real>(block: &mut [T], first: usize, k: usize, indptr: &[i64], indices: &[i64], data: &[T], x: &[T], add: bool) {
    rows(block, first, k, indptr, indices, data, x, add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_worked_product_and_its_errors() {
        // A = [[1, 0, 2], [0, 0, 0], [0, 3, 0]], X = [[1, 2], [3, 4], [5, 6]]
        let (indptr, indices, data) = ([0i64, 2, 2, 3], [0i64, 2, 1], [1.0, 2.0, 3.0]);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        for threads in [None, Some(1), Some(2)] {
            let out = csr_matmul(&indptr, &indices, &data, &x, 3, 2, threads).unwrap();
            assert_eq!(out, vec![11.0, 14.0, 0.0, 0.0, 9.0, 12.0]);
        }
        assert!(csr_matmul(&indptr, &[0, 3, 1], &data, &x, 3, 2, None).is_err());
        assert!(csr_matmul(&[0, 2, 1, 3], &indices, &data, &x, 3, 2, None).is_err());
        assert!(csr_matmul(&indptr, &indices, &data[..2], &x, 3, 2, None).is_err());
        assert!(csr_matmul(&indptr, &indices, &data, &x[..4], 3, 2, None).is_err());
        assert!(csr_matmul(&[], &[], &[], &x, 3, 2, None).is_err());
    }

    #[test]
    fn profiles_by_hand() {
        // rows: 0 padding (empty), 1 = {t0: 1, t2: 2}, 2 = {t1: 4}; users [[0, 1], [2, 1]], w = [0.5, 1]
        let (indptr, indices, data) = ([0i64, 0, 2, 3], [0i64, 2, 1], [1.0f32, 2.0, 4.0]);
        let h = |seq: &'static [i64], w: &'static [f32], scale: f32| Histories { seq, b: 2, t: 2, w, scale };
        let qt = profiles(&indptr, &indices, &data, 3, &h(&[0, 1, 2, 1], &[0.5, 1.0], 2.0)).unwrap();
        // (term, user): user 0 = row 1; user 1 = 0.5 * row 2 + row 1; times 2
        assert_eq!(qt, vec![2.0, 2.0, 0.0, 4.0, 4.0, 4.0]);
        assert!(profiles(&indptr, &indices, &data, 3, &h(&[0, 3, 2, 1], &[0.5, 1.0], 1.0)).is_err());
        assert!(profiles(&indptr, &indices, &data, 3, &h(&[0, 1, 2], &[0.5, 1.0], 1.0)).is_err());
        assert!(profiles(&indptr, &indices, &data, 2, &h(&[0, 1, 2, 1], &[0.5, 1.0], 1.0)).is_err());
        assert!(profiles(&indptr, &indices, &data, 3, &h(&[0, 1, 2, 1], &[0.5], 1.0)).is_err());
        // scores = A @ qt: row 1 . (user columns) = 1 * qt[0] + 2 * qt[2]; row 2 = 4 * qt[1]
        let mut out = vec![1.0f32; 6];
        text_scores(&indptr, &indices, &data, 3, &h(&[0, 1, 2, 1], &[0.5, 1.0], 2.0), &mut out, true, Some(1)).unwrap();
        assert_eq!(out, vec![1.0, 1.0, 11.0, 11.0, 1.0, 17.0]);
        assert!(text_scores(&indptr, &indices, &data, 3, &h(&[0, 1, 2, 1], &[0.5, 1.0], 2.0), &mut out[1..], true, None).is_err());
    }

    #[test]
    fn f32_panels_give_the_plain_loops_bits() {
        // k = 150 spans three f32 panels (64, 64, 22): each value must be the same j-ordered
        // sum of rounded products as the plain loop, for any thread count
        let (n, m, k) = (300usize, 40usize, 150usize);
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut indptr = vec![0i64];
        let (mut indices, mut data) = (Vec::new(), Vec::new());
        for _ in 0..n {
            for _ in 0..(next() % 6) {
                indices.push((next() as usize % m) as i64);
                data.push((next() % 1000) as f32 / 997.0 - 0.5);
            }
            indptr.push(indices.len() as i64);
        }
        let x: Vec<f32> = (0..m * k).map(|_| (next() % 1000) as f32 / 991.0 - 0.5).collect();
        let mut want = vec![0.0f32; n * k];
        for r in 0..n {
            for j in indptr[r] as usize..indptr[r + 1] as usize {
                for col in 0..k {
                    let p = data[j] * x[indices[j] as usize * k + col];
                    want[r * k + col] += p;
                }
            }
        }
        let base: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 * 0.25 - 2.0).collect();
        for threads in [Some(1), Some(3), None] {
            let got = csr_matmul(&indptr, &indices, &data, &x, m, k, threads).unwrap();
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
            // in place: the bits of adding the product afterwards
            let mut sum = base.clone();
            csr_matmul_add(&indptr, &indices, &data, &x, m, k, &mut sum, threads).unwrap();
            assert!(sum.iter().zip(base.iter().zip(&want)).all(|(s, (b, w))| s.to_bits() == (b + w).to_bits()));
        }
        assert!(csr_matmul_add(&indptr, &indices, &data, &x, m, k, &mut vec![0.0f32; n * k - 1], None).is_err());
    }
}
