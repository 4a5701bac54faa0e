//! Small vector kernels, compiled twice (baseline x86-64 and AVX2) and picked at run time, so a
//! portable wheel still runs them at full width. Both versions sum in the same fixed order (16
//! lanes, then the tail) and no multiply-add is fused, so they return the same bits.
//!
//! [`level`] says which version runs: AVX2 when the CPU has it, unless the environment variable
//! `H2REC_SIMD=scalar` asks for the portable one. It is read once, at the first call, which
//! `h2rec._core` makes when imported.
//!
//! There is no AVX-512 copy: `sqdist` and `sqnorm` are bound by the latency of their 16 fixed
//! accumulator lanes, which two AVX2 registers already hold, so wider registers would not shorten
//! them, and `add_rows`, which gathers rows in cluster order, measured no faster with AVX-512
//! (d = 64 and 384, up to 100k rows, on a Xeon with AVX-512). The GEMM in `kmeans` is the `gemm`
//! crate's, which picks AVX-512, AVX2+FMA or scalar code by itself; [`gemm_level`] reports its
//! choice.

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction set the kernels of this module run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Baseline x86-64 (SSE2) or whatever the target has without run-time detection.
    Scalar = 1,
    /// x86-64 with AVX2.
    Avx2 = 2,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
        }
    }
}

/// Environment variable that can force the portable kernels: `scalar`, `avx2` or `auto`.
pub const ENV: &str = "H2REC_SIMD";

/// The best level this CPU supports.
pub fn cpu_level() -> Level {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return Level::Avx2;
    }
    Level::Scalar
}

/// Parses a value of `H2REC_SIMD`: `Ok(None)` for `auto` (or empty), else the level asked for.
pub fn parse_request(v: &str) -> Result<Option<Level>, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "auto" => Ok(None),
        "scalar" => Ok(Some(Level::Scalar)),
        "avx2" => Ok(Some(Level::Avx2)),
        _ => Err(format!("{ENV}={v:?} is not one of auto, avx2, scalar")),
    }
}

/// The request in the environment; an unset variable is `Ok(None)`.
pub fn env_request() -> Result<Option<Level>, String> {
    match std::env::var(ENV) {
        Ok(v) => parse_request(&v),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(format!("{ENV}={v:?} is not one of auto, avx2, scalar")),
    }
}

/// The level that runs for a request on a CPU: the request, but never above what the CPU has.
pub fn choose(request: Option<Level>, cpu: Level) -> Level {
    request.map_or(cpu, |r| r.min(cpu))
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

#[cold]
#[inline(never)]
fn init_level() -> Level {
    // An invalid value counts as `auto` here; the Python module checks it at import and raises.
    let l = choose(env_request().unwrap_or(None), cpu_level());
    LEVEL.store(l as u8, Ordering::Relaxed);
    l
}

/// The level the kernels run with, decided once per process.
#[inline]
pub fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Scalar,
        2 => Level::Avx2,
        _ => init_level(),
    }
}

/// What the `gemm` crate (0.19, feature `x86-v4`) dispatches its f32 GEMM to on this CPU, by the
/// same test it makes: `"avx512"` with AVX-512F, `"avx2"` (its x86-64-v3 AVX2+FMA kernels) with
/// FMA, else `"scalar"`. `H2REC_SIMD` does not change it.
pub fn gemm_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::is_x86_feature_detected!("fma") {
            return "avx2";
        }
    }
    "scalar"
}

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

/// Squared Euclidean distance.
#[inline]
pub fn sqdist(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        // SAFETY: the CPU supports AVX2 (`level` never exceeds `cpu_level`).
        return unsafe { avx2::sqdist(a, b) };
    }
    sqdist_impl(a, b)
}

/// Squared Euclidean norm.
#[inline]
pub fn sqnorm(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        // SAFETY: as above.
        return unsafe { avx2::sqnorm(a) };
    }
    sqnorm_impl(a)
}

/// acc += x[i] for each row index i in `idx`, in order, accumulated in f64.
pub fn add_rows(acc: &mut [f64], x: &[f32], d: usize, idx: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        // SAFETY: as above.
        return unsafe { avx2::add_rows(acc, x, d, idx) };
    }
    add_rows_impl(acc, x, d, idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((rng.unit_f64() * 2.0 - 1.0) as f32) * scale).collect()
    }

    #[test]
    fn dispatched_path_agrees_bit_for_bit_with_scalar() {
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

    /// The AVX2 copies against the portable code on random inputs of every length up to 80 and
    /// a few long ones (tails of 0..15 after the 16-lane chunks), values over many magnitudes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_scalar_agree_on_random_inputs() {
        if cpu_level() < Level::Avx2 {
            eprintln!("no AVX2 on this CPU: only the scalar path exists here");
            return;
        }
        let mut rng = Rng::stream(7, 0x5349_4d44, 0, 0);
        let lens: Vec<usize> = (0..=80).chain([255, 384, 768, 1031]).collect();
        for (t, &n) in lens.iter().enumerate() {
            let scale = [1e-3f32, 1.0, 1e3][t % 3];
            let a = random(&mut rng, n, scale);
            let b = random(&mut rng, n, scale);
            // SAFETY: the CPU has AVX2 (checked above).
            let (d2, n2) = unsafe { (avx2::sqdist(&a, &b), avx2::sqnorm(&a)) };
            assert_eq!(d2.to_bits(), sqdist_impl(&a, &b).to_bits(), "sqdist, n={n}");
            assert_eq!(n2.to_bits(), sqnorm_impl(&a).to_bits(), "sqnorm, n={n}");
            if n == 0 {
                continue;
            }
            let rows = 9;
            let x = random(&mut rng, rows * n, scale);
            let idx: Vec<u32> = (0..13).map(|_| rng.below(rows as u64) as u32).collect();
            let (mut p, mut q) = (vec![0.5f64; n], vec![0.5f64; n]);
            // SAFETY: as above.
            unsafe { avx2::add_rows(&mut p, &x, n, &idx) };
            add_rows_impl(&mut q, &x, n, &idx);
            assert!(p.iter().zip(&q).all(|(u, v)| u.to_bits() == v.to_bits()), "add_rows, n={n}");
        }
    }

    #[test]
    fn level_follows_the_request_but_never_exceeds_the_cpu() {
        assert_eq!(parse_request("auto"), Ok(None));
        assert_eq!(parse_request(""), Ok(None));
        assert_eq!(parse_request(" Scalar "), Ok(Some(Level::Scalar)));
        assert_eq!(parse_request("avx2"), Ok(Some(Level::Avx2)));
        assert!(parse_request("avx512").unwrap_err().contains("H2REC_SIMD"));
        assert_eq!(choose(None, Level::Avx2), Level::Avx2);
        assert_eq!(choose(Some(Level::Scalar), Level::Avx2), Level::Scalar);
        assert_eq!(choose(Some(Level::Avx2), Level::Scalar), Level::Scalar);
        assert_eq!(choose(None, Level::Scalar), Level::Scalar);
        // This process: whatever H2REC_SIMD says, capped by the CPU.
        assert_eq!(level(), choose(env_request().unwrap_or(None), cpu_level()));
        eprintln!("simd level: {} (cpu: {}), gemm: {}", level().name(), cpu_level().name(), gemm_level());
    }
}
