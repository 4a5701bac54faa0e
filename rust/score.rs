//! Inference kernels in f32: full-ranking scores (every item's inner product with a block of
//! user states) and the linear layers of an evaluation forward on the `gemm` crate, and the
//! forward's LayerNorm.

use crate::ensure;
use crate::error::Result;

/// `out` (n × b, row-major) = `items` (n × d) · `states`ᵀ, `states` (b × d), both row-major: the
/// score of every item (a row) for every user of the block (a column), the layout evaluation
/// ranks from. One call of the `gemm` crate on the calling thread (its AVX-512 kernels where
/// the CPU has them, see `simd::gemm_level`), so the bits depend on the CPU only, never on how
/// many callers run side by side. On Beauty (12,102 items, 64 users, d = 64) it is about 2.6 ×
/// as fast as torch's (MKL) product on an AVX-512 AMD EPYC.
pub fn item_scores(items: &[f32], n: usize, states: &[f32], b: usize, d: usize, out: &mut [f32]) -> Result<()> {
    ensure!(Some(items.len()) == n.checked_mul(d), "items has {} values, expected {n} x {d}", items.len());
    ensure!(Some(states.len()) == b.checked_mul(d), "states has {} values, expected {b} x {d}", states.len());
    ensure!(Some(out.len()) == n.checked_mul(b), "out has {} values, expected {n} x {b}", out.len());
    if n == 0 || b == 0 {
        return Ok(());
    }
    if d == 0 {
        out.fill(0.0);
        return Ok(());
    }
    // SAFETY: the three buffers are distinct slices of exactly the sizes the strides address
    // (checked above); gemm reads items and states and writes out only inside those bounds.
    unsafe {
        gemm::gemm(
            n, b, d,
            out.as_mut_ptr(), 1, b as isize, false,
            items.as_ptr(), 1, d as isize,
            states.as_ptr(), d as isize, 1,
            0.0f32, 1.0f32, false, false, false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
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
        if k == 0 {
            continue;
        }
        let (xs, ws) = (&x[gi * m * k..(gi + 1) * m * k], &w[gi * n * k..(gi + 1) * n * k]);
        // SAFETY: dst, xs and ws are distinct slices of exactly the sizes the strides address
        // (checked above); gemm reads xs and ws and reads and writes dst only inside them.
        unsafe {
            gemm::gemm(
                m, n, k,
                dst.as_mut_ptr(), 1, n as isize, true,
                xs.as_ptr(), 1, k as isize,
                ws.as_ptr(), k as isize, 1,
                1.0f32, 1.0f32, false, false, false,
                gemm::Parallelism::None,
            );
        }
    }
    Ok(())
}

/// LayerNorm over rows of d values: `out` (m × d) = (x - mean) / sqrt(var + eps) (* `weight` +
/// `bias`, each (d,) when given), mean and (biased) variance of the row, both summed in 16
/// lanes then across them (two passes over the row). Equal to `torch.nn.functional.layer_norm`
/// up to float rounding; on the calling thread, AVX2 where the CPU has it.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm(x: &[f32], m: usize, d: usize, weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32, out: &mut [f32]) -> Result<()> {
    ensure!(Some(x.len()) == m.checked_mul(d), "x has {} values, expected {m} x {d}", x.len());
    ensure!(out.len() == x.len(), "out has {} values, expected {m} x {d}", out.len());
    if let Some(w) = weight {
        ensure!(w.len() == d, "weight has {} values, expected {d}", w.len());
    }
    if let Some(b) = bias {
        ensure!(b.len() == d, "bias has {} values, expected {d}", b.len());
    }
    ensure!(eps >= 0.0, "eps={eps} must be >= 0");
    if d == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx2 {
        // SAFETY: the CPU has AVX2 (`simd::level` never exceeds what it detects).
        unsafe { norm_rows_avx2(x, d, weight, bias, eps, out) };
        return Ok(());
    }
    norm_rows(x, d, weight, bias, eps, out);
    Ok(())
}

#[inline(always)]
fn lane_sum(row: &[f32], shift: f32) -> (f32, f32) {
    // (sum of (v - shift), sum of (v - shift)^2), in 16 lanes
    let mut s = [0f32; 16];
    let mut q = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            let v = c[l] - shift;
            s[l] += v;
            q[l] += v * v;
        }
    }
    let (mut ts, mut tq) = (0f32, 0f32);
    for &v in rest {
        let v = v - shift;
        ts += v;
        tq += v * v;
    }
    (s.iter().sum::<f32>() + ts, q.iter().sum::<f32>() + tq)
}

#[inline(always)]
fn norm_rows(x: &[f32], d: usize, weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let n = d as f32;
    for (row, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (s, _) = lane_sum(row, 0.0);
        let mean = s / n;
        let (_, q) = lane_sum(row, mean);
        let rstd = 1.0 / (q / n + eps).sqrt();
        match (weight, bias) {
            (Some(w), Some(b)) => {
                for i in 0..d {
                    dst[i] = (row[i] - mean) * rstd * w[i] + b[i];
                }
            }
            (Some(w), None) => {
                for i in 0..d {
                    dst[i] = (row[i] - mean) * rstd * w[i];
                }
            }
            (None, Some(b)) => {
                for i in 0..d {
                    dst[i] = (row[i] - mean) * rstd + b[i];
                }
            }
            (None, None) => {
                for i in 0..d {
                    dst[i] = (row[i] - mean) * rstd;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn norm_rows_avx2(x: &[f32], d: usize, weight: Option<&[f32]>, bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    norm_rows(x, d, weight, bias, eps, out)
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
    fn layer_norm_by_the_definition() {
        let (m, d) = (7usize, 37usize);
        let x: Vec<f32> = (0..m * d).map(|i| ((i * 29) % 71) as f32 / 9.0 - 3.0 + (i / d) as f32 * 100.0).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.03).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 * 0.1 - 1.0).collect();
        for (wo, bo) in [(None, None), (Some(&w[..]), Some(&b[..])), (Some(&w[..]), None), (None, Some(&b[..]))] {
            let mut out = vec![f32::NAN; m * d];
            layer_norm(&x, m, d, wo, bo, 1e-5, &mut out).unwrap();
            for r in 0..m {
                let row: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
                let mean = row.iter().sum::<f64>() / d as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
                for i in 0..d {
                    let mut want = (row[i] - mean) / (var + 1e-5).sqrt();
                    if let Some(w) = wo {
                        want *= w[i] as f64;
                    }
                    if let Some(b) = bo {
                        want += b[i] as f64;
                    }
                    assert!((out[r * d + i] as f64 - want).abs() < 1e-4, "({r}, {i})");
                }
            }
        }
        let mut out = vec![0.0f32; m * d];
        assert!(layer_norm(&x, m, d, Some(&w[1..]), None, 1e-5, &mut out).is_err());
        assert!(layer_norm(&x[1..], m, d, None, None, 1e-5, &mut out).is_err());
        assert!(layer_norm(&x, m, d, None, None, -1.0, &mut out).is_err());
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
