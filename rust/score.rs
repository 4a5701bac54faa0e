//! Inference products in f32 on the `gemm` crate: full-ranking scores (every item's inner
//! product with a block of user states) and the linear layers of an evaluation forward.

use crate::ensure;
use crate::error::Result;

/// `out` (n × b, row-major) = `items` (n × d) · `states`ᵀ, `states` (b × d), both row-major: the
/// score of every item (a row) for every user of the block (a column), the layout evaluation
/// ranks from. One call of the `gemm` crate on the calling thread (its AVX-512 kernels where
/// the CPU has them, see `simd::gemm_level`): the bits depend on the CPU, never on how many
/// callers run side by side, nor on how many users the block holds (checked for 1 to 256). On Beauty (12,102 items, 64 users, d = 64) it is about 2.6 ×
/// as fast as torch's (MKL) product on an AVX-512 AMD EPYC.
pub fn item_scores(items: &[f32], n: usize, states: &[f32], b: usize, d: usize, out: &mut [f32]) -> Result<()> {
    ensure!(Some(items.len()) == n.checked_mul(d), "items has {} values, expected {n} x {d}", items.len());
    ensure!(Some(states.len()) == b.checked_mul(d), "states has {} values, expected {b} x {d}", states.len());
    ensure!(Some(out.len()) == n.checked_mul(b), "out has {} values, expected {n} x {b}", out.len());
    if n == 0 || b == 0 {
        return Ok(());
    }
    if b == 1 {
        // the gemm crate computes a one-column product by another kernel (its rounding differs):
        // one user is scored as two, so a user's scores do not depend on the block's size
        let twice = [states, states].concat();
        let mut pair: Vec<f32> = crate::error::zeros(n, 2, "the scores")?;
        abt(items, n, &twice, 2, d, &mut pair, false);
        for (o, p) in out.iter_mut().zip(pair.chunks_exact(2)) {
            *o = p[0];
        }
        return Ok(());
    }
    abt(items, n, states, b, d, out, false);
    Ok(())
}

/// out (m × n, row-major) = a (m × k) · bᵀ with b (n × k), both row-major, or (`accumulate`)
/// out += that product: one `gemm` call on the calling thread. The sizes are checked by the
/// callers; a buffer too small for them is a bug, and panics here rather than reading or
/// writing outside it.
pub(crate) fn abt(a: &[f32], m: usize, b: &[f32], n: usize, k: usize, out: &mut [f32], accumulate: bool) {
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n, "abt: buffer sizes");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the three buffers are distinct slices at least as large as the strides address
    // (asserted above); gemm reads a and b and reads and writes out only inside those bounds.
    unsafe {
        gemm::gemm(
            m, n, k,
            out.as_mut_ptr(), 1, n as isize, accumulate,
            a.as_ptr(), 1, k as isize,
            b.as_ptr(), k as isize, 1,
            1.0f32, 1.0f32, false, false, false,
            gemm::Parallelism::None,
        );
    }
}

/// `out` (g × m × n) = `x` (g × m × k) · `w`ᵀ (+ `bias`), `w` (g × n × k), `bias` (g × n),
/// all row-major: g independent linear layers (`torch.nn.functional.linear` of each group),
/// each one `gemm` call on the calling thread (its AVX-512 kernels where the CPU has them:
/// about 2.3 × torch's MKL product at m = 1,800, k = n = 64 on an AVX-512 AMD EPYC). With a
/// bias, `out` starts as the bias and the product is added to it.
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], g: usize, m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, out: &mut [f32]) -> Result<()> {
    let size = |a: usize, b: usize| g.checked_mul(a).and_then(|v| v.checked_mul(b));
    ensure!(Some(x.len()) == size(m, k), "x has {} values, expected {g} x {m} x {k}", x.len());
    ensure!(Some(w.len()) == size(n, k), "w has {} values, expected {g} x {n} x {k}", w.len());
    ensure!(Some(out.len()) == size(m, n), "out has {} values, expected {g} x {m} x {n}", out.len());
    if let Some(b) = bias {
        ensure!(Some(b.len()) == g.checked_mul(n), "bias has {} values, expected {g} x {n}", b.len());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    for gi in 0..g {
        let dst = &mut out[gi * m * n..(gi + 1) * m * n];
        match bias {
            Some(b) => {
                for row in dst.chunks_exact_mut(n) {
                    row.copy_from_slice(&b[gi * n..(gi + 1) * n]);
                }
            }
            None => dst.fill(0.0),
        }
        let (xs, ws) = (&x[gi * m * k..(gi + 1) * m * k], &w[gi * n * k..(gi + 1) * n * k]);
        abt(xs, m, ws, n, k, dst, true);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_the_inner_products() {
        let (n, b, d) = (37usize, 5usize, 19usize);
        let items: Vec<f32> = (0..n * d).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let states: Vec<f32> = (0..b * d).map(|i| ((i * 53) % 97) as f32 / 40.0 - 1.2).collect();
        let mut out = vec![f32::NAN; n * b];
        item_scores(&items, n, &states, b, d, &mut out).unwrap();
        for i in 0..n {
            for u in 0..b {
                let want: f64 = (0..d).map(|k| items[i * d + k] as f64 * states[u * d + k] as f64).sum();
                assert!((out[i * b + u] as f64 - want).abs() < 1e-4, "({i}, {u}): {} vs {want}", out[i * b + u]);
            }
        }
        let mut empty = vec![1.0f32; n * b];
        item_scores(&items[..0], n, &states[..0], b, 0, &mut empty).unwrap();
        assert!(empty.iter().all(|&v| v == 0.0));
        assert!(item_scores(&items, n, &states, b, d, &mut out[1..]).is_err());
        assert!(item_scores(&items[1..], n, &states, b, d, &mut out).is_err());
        assert!(item_scores(&items, n, &states[1..], b, d, &mut out).is_err());
    }

    #[test]
    fn linear_layers_by_the_definition() {
        let (g, m, k, n) = (2usize, 9usize, 13usize, 6usize);
        let x: Vec<f32> = (0..g * m * k).map(|i| ((i * 31) % 89) as f32 / 40.0 - 1.0).collect();
        let w: Vec<f32> = (0..g * n * k).map(|i| ((i * 17) % 83) as f32 / 30.0 - 1.3).collect();
        let bias: Vec<f32> = (0..g * n).map(|i| i as f32 * 0.5 - 2.0).collect();
        for with_bias in [false, true] {
            let mut out = vec![f32::NAN; g * m * n];
            linear(&x, g, m, k, &w, n, with_bias.then_some(&bias[..]), &mut out).unwrap();
            for gi in 0..g {
                for r in 0..m {
                    for c in 0..n {
                        let mut want: f64 = if with_bias { bias[gi * n + c] as f64 } else { 0.0 };
                        for i in 0..k {
                            want += x[(gi * m + r) * k + i] as f64 * w[(gi * n + c) * k + i] as f64;
                        }
                        let got = out[(gi * m + r) * n + c] as f64;
                        assert!((got - want).abs() < 1e-4, "({gi}, {r}, {c}): {got} vs {want}");
                    }
                }
            }
        }
        let mut out = vec![0.0f32; g * m * n];
        assert!(linear(&x, g, m, k, &w, n, Some(&bias[1..]), &mut out).is_err());
        assert!(linear(&x[1..], g, m, k, &w, n, None, &mut out).is_err());
        assert!(linear(&x, g, m, k, &w[1..], n, None, &mut out).is_err());
        assert!(linear(&x, g, m, k, &w, n, None, &mut out[1..]).is_err());
    }
}
