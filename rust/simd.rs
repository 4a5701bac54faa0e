//! Small vector kernels, compiled twice (baseline x86-64 and AVX2) and picked at run time, so a
//! portable wheel still runs them at full width. Both versions sum in the same fixed order (16
//! lanes, then the tail) and no multiply-add is fused, so they return the same bits.

#[inline(always)]
fn sqdist_impl(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            let t = x[l] - y[l];
            acc[l] += t * t;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += (x - y) * (x - y);
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn sqnorm_impl(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let ra = ca.remainder();
    for x in ca {
        for l in 0..16 {
            acc[l] += x[l] * x[l];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().map(|v| v * v).sum::<f32>()
}

/// acc += rows `idx` of the row-major (·, d) matrix `x`, in the order given, in f64.
#[inline(always)]
fn add_rows_impl(acc: &mut [f64], x: &[f32], d: usize, idx: &[u32]) {
    for &i in idx {
        let row = &x[i as usize * d..(i as usize + 1) * d];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2")]
    pub unsafe fn sqdist(a: &[f32], b: &[f32]) -> f32 {
        super::sqdist_impl(a, b)
    }
    #[target_feature(enable = "avx2")]
    pub unsafe fn sqnorm(a: &[f32]) -> f32 {
        super::sqnorm_impl(a)
    }
    #[target_feature(enable = "avx2")]
    pub unsafe fn add_rows(acc: &mut [f64], x: &[f32], d: usize, idx: &[u32]) {
        super::add_rows_impl(acc, x, d, idx)
    }
}

#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Squared Euclidean distance.
#[inline]
pub fn sqdist(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 (checked at run time).
        return unsafe { avx2::sqdist(a, b) };
    }
    sqdist_impl(a, b)
}

/// Squared Euclidean norm.
#[inline]
pub fn sqnorm(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::sqnorm(a) };
    }
    sqnorm_impl(a)
}

/// acc += x[i] for each row index i in `idx`, in order, accumulated in f64.
pub fn add_rows(acc: &mut [f64], x: &[f32], d: usize, idx: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::add_rows(acc, x, d, idx) };
    }
    add_rows_impl(acc, x, d, idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_paths_agree_bit_for_bit() {
        let a: Vec<f32> = (0..389).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..389).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        assert!((sqdist(&a, &b) as f64 - want).abs() < 1e-3);
        assert_eq!(sqdist(&a, &b).to_bits(), sqdist_impl(&a, &b).to_bits());
        assert_eq!(sqnorm(&a).to_bits(), sqnorm_impl(&a).to_bits());
        let (mut p, mut q) = (vec![0f64; 389], vec![0f64; 389]);
        let x: Vec<f32> = a.iter().chain(&b).copied().collect();
        add_rows(&mut p, &x, 389, &[1, 0, 1]);
        add_rows_impl(&mut q, &x, 389, &[1, 0, 1]);
        assert_eq!(p, q);
    }
}
