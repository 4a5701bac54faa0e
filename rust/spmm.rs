//! Sparse (CSR) times dense, in f64: the products of the TF-IDF embedding's randomized SVD.

use rayon::prelude::*;

use crate::ensure;
use crate::error::Result;

/// Rows of the output one task computes (a few hundred KB of output at k = 266).
const ROWS_PER_TASK: usize = 128;

/// `A @ X` for `A` (n × m) in CSR form (`indptr` (n + 1), `indices` (nnz), `data` (nnz)) and
/// `X` (m × k) row-major; returns the (n × k) product, row-major.
///
/// Output row r is `sum_j data[j] * X[indices[j]]` over j in `indptr[r]..indptr[r + 1]`, added
/// one after another in j order, each product rounded before it is added (no fused
/// multiply-add): the bits of the plain loop from zero (and of scipy.sparse's CSR product). A
/// row without entries is zero. Each row is computed by one thread, so the result does not
/// depend on `n_threads` (`None`: the global pool); the AVX2 body (when the CPU has it) computes
/// the same products and sums lane by lane, so the bits do not depend on it either.
pub fn csr_matmul(
    indptr: &[i64],
    indices: &[i64],
    data: &[f64],
    x: &[f64],
    m: usize,
    k: usize,
    n_threads: Option<usize>,
) -> Result<Vec<f64>> {
    ensure!(!indptr.is_empty(), "indptr is empty: a CSR matrix of n rows has n + 1 offsets");
    let n = indptr.len() - 1;
    let nnz = indices.len();
    ensure!(data.len() == nnz, "data has {} values for {nnz} indices", data.len());
    ensure!(indptr[0] == 0, "indptr[0]={} must be 0", indptr[0]);
    ensure!(indptr[n] as usize == nnz && indptr[n] >= 0, "indptr[{n}]={} must be nnz={nnz}", indptr[n]);
    if let Some(r) = (0..n).find(|&r| indptr[r + 1] < indptr[r]) {
        return Err(crate::invalid!("indptr decreases at row {r}: {} then {}", indptr[r], indptr[r + 1]));
    }
    let size = m.checked_mul(k).ok_or_else(|| crate::invalid!("dense of {m} x {k} is too large"))?;
    ensure!(x.len() == size, "dense has {} values, expected {m} x {k}", x.len());
    if let Some(j) = indices.iter().position(|&c| c < 0 || c as usize >= m) {
        return Err(crate::invalid!("indices[{j}]={} is outside the {m} rows of dense", indices[j]));
    }
    let total = n.checked_mul(k).ok_or_else(|| crate::invalid!("output of {n} x {k} is too large"))?;
    let mut out: Vec<f64> = Vec::new();
    out.try_reserve_exact(total)
        .map_err(|_| crate::invalid!("no memory for the {n} x {k} output ({} bytes)", total.saturating_mul(8)))?;
    out.resize(total, 0.0);
    if k == 0 || n == 0 {
        return Ok(out);
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = crate::simd::level() == crate::simd::Level::Avx2;
    crate::pool::run(n_threads, || {
        out.par_chunks_mut(ROWS_PER_TASK.saturating_mul(k)).enumerate().for_each(|(t, block)| {
            let first = t * ROWS_PER_TASK;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (`simd::level` never exceeds what it detects).
                return unsafe { rows_avx2(block, first, k, indptr, indices, data, x) };
            }
            rows(block, first, k, indptr, indices, data, x);
        });
    })?;
    Ok(out)
}

/// The output rows `first..` of `block` (whole rows of k values), from zero.
#[inline(always)]
fn rows(block: &mut [f64], first: usize, k: usize, indptr: &[i64], indices: &[i64], data: &[f64], x: &[f64]) {
    for (i, row) in block.chunks_exact_mut(k).enumerate() {
        let r = first + i;
        for j in indptr[r] as usize..indptr[r + 1] as usize {
            let c = indices[j] as usize;
            let a = data[j];
            for (o, &v) in row.iter_mut().zip(&x[c * k..(c + 1) * k]) {
                *o += a * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(block: &mut [f64], first: usize, k: usize, indptr: &[i64], indices: &[i64], data: &[f64], x: &[f64]) {
    rows(block, first, k, indptr, indices, data, x)
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
}
