//! k-means and residual k-means (RQ-KMeans) for Semantic IDs.
//!
//! Lloyd iterations with a GEMM distance kernel: ||x - c||² = ||x||² - 2 x·c + ||c||², the x·c
//! block computed by `gemm` over fixed blocks of `BLOCK` rows (one block per rayon task, gemm
//! itself single-threaded), so every number is computed the same way whatever the thread count.
//! Centroid sums are taken per cluster in point order, in f64. Initialisation is k-means++ on a
//! seeded subsample; an emptied cluster is repaired by splitting the largest one (as faiss does).
//! Without a size cap, the iterations skip the rows that Hamerly's distance bounds show cannot
//! have changed centroid (`lloyd_bounded`), assigning as the plain iterations do (up to the GEMM
//! kernel's rounding, which depends on how many rows it gets, at exact ties).

use rayon::prelude::*;

use crate::error::Result;
use crate::ensure;
use crate::rng::{Rng, TAG_KMEANS};
pub use crate::simd::{sqdist, sqnorm};

/// Rows per distance block.
const BLOCK: usize = 2048;
/// k-means++ runs on at most max(INIT_PER_CLUSTER * k, INIT_MIN) points.
const INIT_PER_CLUSTER: usize = 8;
const INIT_MIN: usize = 1024;
/// Relative perturbation when a cluster is split to refill an empty one.
const SPLIT_EPS: f32 = 1.0 / 1024.0;

#[derive(Debug, Clone)]
pub struct KMeansOpts {
    pub k: usize,
    pub n_iter: usize,
    pub seed: u64,
    pub balanced: bool,
    pub init: Init,
}

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// k-means++ (D² sampling) on a seeded subsample.
    KMeansPlusPlus,
    /// k distinct points drawn uniformly (what faiss does).
    Random,
}

/// Checks an (n × d) float matrix: non-empty and finite.
pub fn check_matrix(name: &str, x: &[f32], n: usize, d: usize) -> Result<()> {
    ensure!(n >= 1 && d >= 1, "{name} has shape ({n}, {d}); it needs at least one row and one column");
    ensure!(x.len() == n * d, "{name} has {} values, expected {n} × {d}", x.len());
    const CH: usize = 1 << 16;
    let bad = x
        .par_chunks(CH)
        .enumerate()
        .find_map_first(|(c, ch)| ch.iter().position(|v| !v.is_finite()).map(|p| c * CH + p));
    if let Some(i) = bad {
        return Err(crate::invalid!("{name}[{}, {}]={} is not finite", i / d, i % d, x[i]));
    }
    Ok(())
}

/// out (m × k, row-major) = a (m × d) · bᵀ, with b (k × d); both row-major.
fn gemm_abt(a: &[f32], m: usize, b: &[f32], k: usize, d: usize, out: &mut [f32]) {
    crate::score::abt(a, m, b, k, d, out, false);
}

fn row_norms(x: &[f32], d: usize) -> Vec<f32> {
    x.par_chunks(d).map(sqnorm).collect()
}

/// Nearest centroid of every row and its squared distance.
pub fn nearest(x: &[f32], n: usize, d: usize, c: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    nearest_impl(x, n, d, c, k, true)
}

/// Nearest centroid of every row; squared distances only when `with_dist` (else zeros).
fn nearest_impl(x: &[f32], n: usize, d: usize, c: &[f32], k: usize, with_dist: bool) -> (Vec<u32>, Vec<f32>) {
    let cn = row_norms(c, d);
    let mut assign = vec![0u32; n];
    let mut dist = vec![0f32; n];
    x.par_chunks(BLOCK * d)
        .zip(assign.par_chunks_mut(BLOCK))
        .zip(dist.par_chunks_mut(BLOCK))
        .for_each(|((xb, ab), db)| {
            let m = ab.len();
            let mut g = vec![0f32; m * k];
            gemm_abt(xb, m, c, k, d, &mut g);
            for i in 0..m {
                let gi = &g[i * k..(i + 1) * k];
                let (mut best, mut bj) = (f32::INFINITY, 0usize);
                for j in 0..k {
                    let v = cn[j] - 2.0 * gi[j];
                    if v < best {
                        best = v;
                        bj = j;
                    }
                }
                ab[i] = bj as u32;
                if with_dist {
                    db[i] = (sqnorm(&xb[i * d..(i + 1) * d]) + best).max(0.0);
                }
            }
        });
    (assign, dist)
}

/// All squared distances (n × k).
fn all_distances(x: &[f32], n: usize, d: usize, c: &[f32], k: usize) -> Vec<f32> {
    let cn = row_norms(c, d);
    let mut out = vec![0f32; n * k];
    x.par_chunks(BLOCK * d).zip(out.par_chunks_mut(BLOCK * k)).for_each(|(xb, ob)| {
        let m = ob.len() / k;
        gemm_abt(xb, m, c, k, d, ob);
        for i in 0..m {
            let xn = sqnorm(&xb[i * d..(i + 1) * d]);
            for j in 0..k {
                let g = ob[i * k + j];
                ob[i * k + j] = (xn + cn[j] - 2.0 * g).max(0.0);
            }
        }
    });
    out
}

/// Capacity-constrained assignment: each cluster takes at most ceil(n / k) points. Points with
/// the most to lose (largest gap between their two nearest centroids) choose first; each takes
/// its nearest centroid that still has room. Ties go to the lower index.
fn balanced_assign(x: &[f32], n: usize, d: usize, c: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let dist = all_distances(x, n, d, c, k);
    let cap = n.div_ceil(k);
    let regret: Vec<f32> = dist
        .par_chunks(k)
        .map(|r| {
            let (mut a, mut b) = (f32::INFINITY, f32::INFINITY);
            for &v in r {
                if v < a {
                    b = a;
                    a = v;
                } else if v < b {
                    b = v;
                }
            }
            if b.is_finite() { b - a } else { 0.0 }
        })
        .collect();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.par_sort_by(|&a, &b| regret[b as usize].total_cmp(&regret[a as usize]).then(a.cmp(&b)));
    let mut fill = vec![0usize; k];
    let mut assign = vec![0u32; n];
    let mut best = vec![0f32; n];
    for &i in &order {
        let row = &dist[i as usize * k..(i as usize + 1) * k];
        let (mut bv, mut bj) = (f32::INFINITY, usize::MAX);
        for (j, &v) in row.iter().enumerate() {
            if fill[j] < cap && v < bv {
                bv = v;
                bj = j;
            }
        }
        if bj == usize::MAX {
            // every row is infinite only if k == 0, which callers exclude; take any open cluster
            bj = fill.iter().position(|&f| f < cap).unwrap_or(0);
            bv = row[bj];
        }
        fill[bj] += 1;
        assign[i as usize] = bj as u32;
        best[i as usize] = bv;
    }
    (assign, best)
}

/// k distinct rows drawn uniformly.
fn random_init(x: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::stream(seed, TAG_KMEANS, 0, 2);
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let mut cent = vec![0f32; k * d];
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
        let r = idx[i] as usize;
        cent[i * d..(i + 1) * d].copy_from_slice(&x[r * d..(r + 1) * d]);
    }
    cent
}

/// k-means++ seeding on a subsample of the rows.
fn kmeanspp(x: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::stream(seed, TAG_KMEANS, 0, 1);
    let s = n.min((INIT_PER_CLUSTER * k).max(INIT_MIN));
    // partial Fisher–Yates: the first s entries are a uniform sample without replacement
    let mut idx: Vec<u32> = (0..n as u32).collect();
    for i in 0..s {
        let j = i + rng.below((n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut sample = vec![0f32; s * d];
    sample.par_chunks_mut(d).zip(idx[..s].par_iter()).for_each(|(dst, &i)| {
        dst.copy_from_slice(&x[i as usize * d..(i as usize + 1) * d]);
    });
    let mut cent = vec![0f32; k * d];
    let first = rng.below(s as u64) as usize;
    cent[..d].copy_from_slice(&sample[first * d..(first + 1) * d]);
    let mut d2 = vec![f32::INFINITY; s];
    for c in 0..k {
        if c > 0 {
            let total: f64 = d2.iter().map(|&v| v as f64).sum();
            let pick = if total > 0.0 {
                let target = rng.unit_f64() * total;
                let mut acc = 0.0f64;
                let mut p = s - 1;
                for (i, &v) in d2.iter().enumerate() {
                    acc += v as f64;
                    if acc > target && v > 0.0 {
                        p = i;
                        break;
                    }
                }
                p
            } else {
                rng.below(s as u64) as usize
            };
            cent[c * d..(c + 1) * d].copy_from_slice(&sample[pick * d..(pick + 1) * d]);
        }
        let cc = &cent[c * d..(c + 1) * d];
        let update = |(rows, dvs): (&[f32], &mut [f32])| {
            for (row, dv) in rows.chunks_exact(d).zip(dvs.iter_mut()) {
                let dist = sqdist(row, cc);
                if dist < *dv {
                    *dv = dist;
                }
            }
        };
        // 256 rows a task: finer splitting costs more in scheduling than it saves
        sample.par_chunks(256 * d).zip(d2.par_chunks_mut(256)).for_each(update);
    }
    cent
}

/// Means of the assigned points; returns the count per cluster. Empty clusters keep their centroid.
fn update_centroids(x: &[f32], n: usize, d: usize, assign: &[u32], cent: &mut [f32], k: usize) -> Vec<usize> {
    let mut counts = vec![0usize; k];
    for &a in assign {
        counts[a as usize] += 1;
    }
    let mut start = vec![0usize; k + 1];
    for j in 0..k {
        start[j + 1] = start[j] + counts[j];
    }
    let mut members = vec![0u32; n];
    let mut pos = start.clone();
    for (i, &a) in assign.iter().enumerate() {
        members[pos[a as usize]] = i as u32;
        pos[a as usize] += 1;
    }
    cent.par_chunks_mut(d).enumerate().for_each(|(j, cj)| {
        let m = &members[start[j]..start[j + 1]];
        if m.is_empty() {
            return;
        }
        let mut acc = vec![0f64; d];
        crate::simd::add_rows(&mut acc, x, d, m);
        let inv = 1.0 / m.len() as f64;
        for (c, a) in cj.iter_mut().zip(&acc) {
            *c = (a * inv) as f32;
        }
    });
    counts
}

/// Refills each empty cluster by splitting the currently largest one. Returns whether any was.
fn repair_empty(cent: &mut [f32], counts: &mut [usize], d: usize) -> bool {
    let k = counts.len();
    let mut repaired = false;
    for j in 0..k {
        if counts[j] > 0 {
            continue;
        }
        let big = (0..k).max_by(|&a, &b| counts[a].cmp(&counts[b]).then(b.cmp(&a))).unwrap_or(0);
        if counts[big] < 2 {
            break;
        }
        for t in 0..d {
            let v = cent[big * d + t];
            let s = if t % 2 == 0 { SPLIT_EPS } else { -SPLIT_EPS };
            cent[j * d + t] = v * (1.0 + s);
            cent[big * d + t] = v * (1.0 - s);
        }
        counts[j] = counts[big] / 2;
        counts[big] -= counts[j];
        repaired = true;
    }
    repaired
}

/// Per-row bounds on Euclidean distances (f64): `upper[i]` is at least the distance from row i
/// to its centroid, `lower[i]` at most its distance to any other centroid.
struct Bounds {
    assign: Vec<u32>,
    upper: Vec<f64>,
    lower: Vec<f64>,
}

/// Rounding allowance on a squared distance computed as ||x||² - 2 x·c + ||c||² in f32 (a
/// generous multiple of the worst case d·ε·(||x|| + ||c||)²): true and computed squared
/// distances differ by less than this.
fn tolerance(xn: f32, cmax: f32, d: usize) -> f64 {
    let s = (xn.max(0.0) as f64).sqrt() + (cmax.max(0.0) as f64).sqrt();
    4.0 * d as f64 * f32::EPSILON as f64 * s * s
}

/// Nearest and second-nearest centroid of the rows `rows` of x, by blocks of BLOCK gathered
/// rows through the GEMM kernel: (row, centroid, upper, lower) for each, the bounds widened by
/// the rounding allowance.
#[allow(clippy::too_many_arguments)]
fn nearest_two(
    x: &[f32], d: usize, rows: &[u32], c: &[f32], k: usize, xn: &[f32], cn: &[f32], cmax: f32,
) -> Vec<(u32, u32, f64, f64)> {
    rows.par_chunks(BLOCK)
        .flat_map_iter(|idx| {
            let m = idx.len();
            let mut xb = vec![0f32; m * d];
            for (t, &i) in idx.iter().enumerate() {
                xb[t * d..(t + 1) * d].copy_from_slice(&x[i as usize * d..(i as usize + 1) * d]);
            }
            let mut g = vec![0f32; m * k];
            gemm_abt(&xb, m, c, k, d, &mut g);
            let mut out = Vec::with_capacity(m);
            for (t, &i) in idx.iter().enumerate() {
                let gi = &g[t * k..(t + 1) * k];
                let (mut b1, mut j1, mut b2) = (f32::INFINITY, 0usize, f32::INFINITY);
                for j in 0..k {
                    let v = cn[j] - 2.0 * gi[j];
                    if v < b1 {
                        b2 = b1;
                        b1 = v;
                        j1 = j;
                    } else if v < b2 {
                        b2 = v;
                    }
                }
                let xi = xn[i as usize];
                let tol = tolerance(xi, cmax, d);
                let upper = ((xi + b1) as f64 + tol).max(0.0).sqrt();
                let lower = if b2.is_finite() { ((xi + b2) as f64 - tol).max(0.0).sqrt() } else { f64::INFINITY };
                out.push((i, j1 as u32, upper, lower));
            }
            out.into_iter()
        })
        .collect()
}

/// Lloyd iterations from `cent` that skip, by Hamerly's bounds, the rows whose centroid cannot
/// have changed: after an update each row's upper bound grows by how far its centroid moved and
/// its lower bound falls by the largest move; a row is recomputed only when the bounds no longer
/// separate its centroid from the others by the rounding allowance on both sides (first from
/// its exact distance to its own centroid, then against every centroid). A skipped row is thus
/// one whose computed nearest centroid could not have changed, so the iterations assign as the
/// plain ones do, at a fraction of the GEMM work once few rows move; the recomputed rows go
/// through the GEMM in gathered blocks, whose rounding can differ from the full blocks' (the
/// kernel's blocking depends on the row count), which matters only for a row equidistant from
/// two centroids to within that rounding. The result depends on the thread count in no case.
/// Stops at a fixed point as they do; the caller assigns every row once more against the final
/// centroids. Returns how many rows were assigned against every centroid, over all iterations.
fn lloyd_bounded(x: &[f32], n: usize, d: usize, k: usize, cent: &mut [f32], n_iter: usize) -> usize {
    let mut full = 0usize;
    if n_iter == 0 {
        return full;
    }
    let xn = row_norms(x, d);
    let all: Vec<u32> = (0..n as u32).collect();
    let mut b = Bounds { assign: vec![0; n], upper: vec![0.0; n], lower: vec![0.0; n] };
    let mut repaired = false;
    for it in 0..n_iter {
        let cn = row_norms(cent, d);
        let cmax = cn.iter().cloned().fold(0f32, f32::max);
        let todo: Vec<u32> = if it == 0 {
            all.clone()
        } else {
            // tighten: the exact distance to the row's own centroid, where the bounds overlap
            let c: &[f32] = cent;
            let keep: Vec<(bool, f64)> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let tol = tolerance(xn[i], cmax, d);
                    // (a lower bound that has fallen below zero separates nothing)
                    let sep = |u: f64, l: f64| l > u && u * u + 2.0 * tol < l * l;
                    if sep(b.upper[i], b.lower[i]) {
                        return (true, b.upper[i]);
                    }
                    let a = b.assign[i] as usize;
                    let exact = sqdist(&x[i * d..(i + 1) * d], &c[a * d..(a + 1) * d]) as f64;
                    let u = (exact * (1.0 + 4.0 * d as f64 * f32::EPSILON as f64) + tol).sqrt();
                    (sep(u, b.lower[i]), u)
                })
                .collect();
            let mut todo = Vec::new();
            for (i, &(kept, u)) in keep.iter().enumerate() {
                b.upper[i] = u;
                if !kept {
                    todo.push(i as u32);
                }
            }
            todo
        };
        let mut changed = false;
        full += todo.len();
        for (i, j, u, l) in nearest_two(x, d, &todo, cent, k, &xn, &cn, cmax) {
            let i = i as usize;
            changed |= it > 0 && b.assign[i] != j;
            b.assign[i] = j;
            b.upper[i] = u;
            b.lower[i] = l;
        }
        if it > 0 && !repaired && !changed {
            break; // a fixed point: the update would reproduce the same centroids
        }
        let before = cent.to_vec();
        let mut counts = update_centroids(x, n, d, &b.assign, cent, k);
        // no repair after the last update, so the final centroids are means of their points
        repaired = it + 1 < n_iter && repair_empty(cent, &mut counts, d);
        // how far each centroid moved, rounded up
        let grow = 1.0 + 4.0 * d as f64 * f32::EPSILON as f64;
        let moved: Vec<f64> = before
            .chunks(d)
            .zip(cent.chunks(d))
            .map(|(p, q)| (sqdist(p, q) as f64 * grow).sqrt() * grow + f64::MIN_POSITIVE)
            .collect();
        let most = moved.iter().cloned().fold(0f64, f64::max);
        b.upper.par_iter_mut().zip(b.assign.par_iter()).for_each(|(u, &a)| *u += moved[a as usize]);
        b.lower.par_iter_mut().for_each(|l| *l -= most);
    }
    full
}

/// One level of k-means. Returns centroids (k × d) and the assignment of each row.
pub fn kmeans(x: &[f32], n: usize, d: usize, o: &KMeansOpts) -> Result<(Vec<f32>, Vec<u32>)> {
    check_matrix("x", x, n, d)?;
    ensure!(o.k >= 1, "k={} must be at least 1", o.k);
    ensure!(o.k <= n, "k={} clusters is more than the {n} points", o.k);
    let k = o.k;
    let mut cent = match o.init {
        Init::KMeansPlusPlus => kmeanspp(x, n, d, k, o.seed),
        Init::Random => random_init(x, n, d, k, o.seed),
    };
    if !o.balanced {
        let _ = lloyd_bounded(x, n, d, k, &mut cent, o.n_iter);
        let (assign, _) = nearest_impl(x, n, d, &cent, k, false);
        return Ok((cent, assign));
    }
    let assign_fn = |c: &[f32]| balanced_assign(x, n, d, c, k);
    let mut prev: Option<Vec<u32>> = None;
    let mut repaired = false;
    for it in 0..o.n_iter {
        let (assign, _) = assign_fn(&cent);
        if !repaired && prev.as_ref() == Some(&assign) {
            break; // a fixed point: the update would reproduce the same centroids
        }
        let mut counts = update_centroids(x, n, d, &assign, &mut cent, k);
        // no repair after the last update, so the final centroids are means of their points
        repaired = it + 1 < o.n_iter && repair_empty(&mut cent, &mut counts, d);
        prev = Some(assign);
    }
    let (assign, _) = assign_fn(&cent);
    Ok((cent, assign))
}

/// Scales each row to unit L2 norm; zero rows stay zero.
pub fn normalize_rows(x: &mut [f32], d: usize) {
    x.par_chunks_mut(d).for_each(|r| {
        let nrm = sqnorm(r).sqrt();
        if nrm > 0.0 {
            r.iter_mut().for_each(|v| *v /= nrm);
        }
    });
}

fn subtract_assigned(r: &mut [f32], d: usize, c: &[f32], assign: &[u32]) {
    r.par_chunks_mut(d).zip(assign.par_iter()).for_each(|(row, &a)| {
        let cj = &c[a as usize * d..(a as usize + 1) * d];
        row.iter_mut().zip(cj).for_each(|(v, c)| *v -= c);
    });
}

#[derive(Debug, Clone)]
pub struct RqOpts {
    pub n_levels: usize,
    pub k: usize,
    pub n_iter: usize,
    pub seed: u64,
    pub normalize: bool,
    pub balanced: bool,
    pub init: Init,
}

/// Residual k-means: codes (n × L, row-major) and codebooks (L × k × d).
pub fn residual_kmeans(x: &[f32], n: usize, d: usize, o: &RqOpts) -> Result<(Vec<i64>, Vec<f32>)> {
    check_matrix("x", x, n, d)?;
    ensure!(o.n_levels >= 1, "n_levels={} must be at least 1", o.n_levels);
    ensure!(o.k >= 1, "codebook_size={} must be at least 1", o.k);
    ensure!(o.k <= n, "codebook_size={} clusters is more than the {n} points", o.k);
    let mut r = x.to_vec();
    let mut codes = vec![0i64; n * o.n_levels];
    let mut books = Vec::with_capacity(o.n_levels * o.k * d);
    for l in 0..o.n_levels {
        if o.normalize {
            normalize_rows(&mut r, d);
        }
        let level_seed = Rng::stream(o.seed, TAG_KMEANS, l as u64, 0).next_u64();
        let ko = KMeansOpts { k: o.k, n_iter: o.n_iter, seed: level_seed, balanced: o.balanced, init: o.init };
        let (c, a) = kmeans(&r, n, d, &ko)?;
        subtract_assigned(&mut r, d, &c, &a);
        for (i, &ai) in a.iter().enumerate() {
            codes[i * o.n_levels + l] = ai as i64;
        }
        books.extend_from_slice(&c);
    }
    Ok((codes, books))
}

fn check_books(x: &[f32], n: usize, d: usize, books: &[f32], l: usize, k: usize, bd: usize) -> Result<()> {
    check_matrix("x", x, n, d)?;
    ensure!(l >= 1 && k >= 1, "codebooks has shape ({l}, {k}, {bd}); it needs at least one level and centroid");
    ensure!(bd == d, "codebooks dimension {bd} does not match x dimension {d}");
    check_matrix("codebooks", books, l * k, d)
}

/// Greedy nearest-centroid codes of `x` under fixed codebooks (L × k × d).
pub fn assign_codes(x: &[f32], n: usize, d: usize, books: &[f32], l: usize, k: usize, normalize: bool) -> Result<Vec<i64>> {
    check_books(x, n, d, books, l, k, d)?;
    let mut r = x.to_vec();
    let mut codes = vec![0i64; n * l];
    for lev in 0..l {
        if normalize {
            normalize_rows(&mut r, d);
        }
        let c = &books[lev * k * d..(lev + 1) * k * d];
        let (a, _) = nearest_impl(&r, n, d, c, k, false);
        subtract_assigned(&mut r, d, c, &a);
        for (i, &ai) in a.iter().enumerate() {
            codes[i * l + lev] = ai as i64;
        }
    }
    Ok(codes)
}

/// Mean squared norm of the residual after each level.
#[allow(clippy::too_many_arguments)]
pub fn reconstruction_errors(
    x: &[f32], n: usize, d: usize, codes: &[i64], books: &[f32], l: usize, k: usize, normalize: bool,
) -> Result<Vec<f64>> {
    check_books(x, n, d, books, l, k, d)?;
    ensure!(codes.len() == n * l, "codes has {} values, expected {n} × {l}", codes.len());
    if let Some(i) = codes.iter().position(|&c| c < 0 || c as usize >= k) {
        return Err(crate::invalid!("codes[{}, {}]={} is not in 0..{k}", i / l, i % l, codes[i]));
    }
    let mut r = x.to_vec();
    let mut out = Vec::with_capacity(l);
    for lev in 0..l {
        if normalize {
            normalize_rows(&mut r, d);
        }
        let c = &books[lev * k * d..(lev + 1) * k * d];
        let a: Vec<u32> = (0..n).map(|i| codes[i * l + lev] as u32).collect();
        subtract_assigned(&mut r, d, c, &a);
        let partial: Vec<f64> = r
            .par_chunks(BLOCK * d)
            .map(|b| b.iter().map(|&v| (v as f64) * (v as f64)).sum())
            .collect();
        out.push(partial.iter().sum::<f64>() / n as f64);
    }
    Ok(out)
}

/// Usage and collision statistics of a code table (n × L, values in 0..k).
#[derive(Debug, Clone, PartialEq)]
pub struct CodeReport {
    pub usage: Vec<f64>,
    pub entropy_bits: Vec<f64>,
    pub n_unique_tuples: usize,
    pub collision_share: f64,
    pub largest_collision_group: usize,
}

pub fn code_report(codes: &[i64], n: usize, l: usize, k: usize) -> Result<CodeReport> {
    ensure!(n >= 1 && l >= 1, "codes has shape ({n}, {l}); it needs at least one row and level");
    ensure!(k >= 1, "codebook_size={k} must be at least 1");
    if let Some(i) = codes.iter().position(|&c| c < 0 || c as usize >= k) {
        return Err(crate::invalid!("codes[{}, {}]={} is not in 0..{k}", i / l, i % l, codes[i]));
    }
    let mut usage = Vec::with_capacity(l);
    let mut entropy = Vec::with_capacity(l);
    for lev in 0..l {
        let mut cnt = vec![0usize; k];
        for i in 0..n {
            cnt[codes[i * l + lev] as usize] += 1;
        }
        usage.push(cnt.iter().filter(|&&c| c > 0).count() as f64 / k as f64);
        entropy.push(
            cnt.iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n as f64;
                    -p * p.log2()
                })
                .sum(),
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.par_sort_by(|&a, &b| codes[a * l..(a + 1) * l].cmp(&codes[b * l..(b + 1) * l]));
    let (mut unique, mut colliding, mut largest) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && codes[order[j] * l..(order[j] + 1) * l] == codes[order[i] * l..(order[i] + 1) * l] {
            j += 1;
        }
        unique += 1;
        if j - i > 1 {
            colliding += j - i;
            largest = largest.max(j - i);
        }
        i = j;
    }
    Ok(CodeReport {
        usage,
        entropy_bits: entropy,
        n_unique_tuples: unique,
        collision_share: colliding as f64 / n as f64,
        largest_collision_group: if colliding == 0 { 1 } else { largest },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (Vec<f32>, usize, usize) {
        // three tight blobs in 2-D
        let mut x = Vec::new();
        let centers = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)];
        let mut r = Rng::stream(1, 1, 1, 1);
        for i in 0..300 {
            let (cx, cy) = centers[i % 3];
            x.push(cx + (r.unit_f64() as f32 - 0.5) * 0.1);
            x.push(cy + (r.unit_f64() as f32 - 0.5) * 0.1);
        }
        (x, 300, 2)
    }

    #[test]
    fn nearest_matches_brute_force() {
        let (x, n, d) = blobs();
        let c = vec![0.0, 0.0, 10.0, 0.0, 0.0, 10.0, 5.0, 5.0];
        let (a, dist) = nearest(&x, n, d, &c, 4);
        for i in 0..n {
            let ds: Vec<f32> = (0..4)
                .map(|j| (x[i * 2] - c[j * 2]).powi(2) + (x[i * 2 + 1] - c[j * 2 + 1]).powi(2))
                .collect();
            let bj = (0..4).min_by(|&p, &q| ds[p].total_cmp(&ds[q])).unwrap();
            assert_eq!(a[i] as usize, bj);
            assert!((dist[i] - ds[bj]).abs() < 1e-3);
        }
    }

    #[test]
    fn finds_the_blobs() {
        let (x, n, d) = blobs();
        let (c, a) = kmeans(&x, n, d, &KMeansOpts { k: 3, n_iter: 10, seed: 3, balanced: false, init: Init::KMeansPlusPlus }).unwrap();
        for i in 0..n {
            assert_eq!(a[i], a[i % 3], "point {i}");
        }
        let mut cs: Vec<(i32, i32)> = c.chunks(2).map(|p| (p[0].round() as i32, p[1].round() as i32)).collect();
        cs.sort();
        assert_eq!(cs, vec![(0, 0), (0, 10), (10, 0)]);
    }

    /// Lloyd iterations as `kmeans` ran them before the bounds: every row against every
    /// centroid, every iteration.
    fn lloyd_plain(x: &[f32], n: usize, d: usize, k: usize, cent: &mut [f32], n_iter: usize) {
        let mut prev: Option<Vec<u32>> = None;
        let mut repaired = false;
        for it in 0..n_iter {
            let (assign, _) = nearest_impl(x, n, d, cent, k, false);
            if !repaired && prev.as_ref() == Some(&assign) {
                break;
            }
            let mut counts = update_centroids(x, n, d, &assign, cent, k);
            repaired = it + 1 < n_iter && repair_empty(cent, &mut counts, d);
            prev = Some(assign);
        }
    }

    #[test]
    fn bounded_lloyd_assigns_as_the_plain_one() {
        // 4000 points around 40 centres in 24-D (no row within rounding of a tie), 64 clusters:
        // the same centroids to the bit, with most rows skipped after a few rounds
        let (n, d, k) = (4000usize, 24usize, 64usize);
        let mut r = Rng::stream(7, 2, 3, 4);
        let centres: Vec<f32> = (0..40 * d).map(|_| (r.unit_f64() as f32 - 0.5) * 6.0).collect();
        let mut x = Vec::with_capacity(n * d);
        for i in 0..n {
            let c = (i * 7) % 40;
            for t in 0..d {
                x.push(centres[c * d + t] + (r.unit_f64() as f32 - 0.5));
            }
        }
        for (iters, seed) in [(1usize, 1u64), (2, 2), (25, 3), (60, 4)] {
            let start = kmeanspp(&x, n, d, k, seed);
            let (mut plain, mut bounded) = (start.clone(), start.clone());
            lloyd_plain(&x, n, d, k, &mut plain, iters);
            let full = lloyd_bounded(&x, n, d, k, &mut bounded, iters);
            assert_eq!(plain, bounded, "{iters} iterations");
            if iters >= 25 {
                assert!(full < n * iters / 3, "{full} full assignments in {iters} iterations");
            }
        }
        // and through kmeans: the codes of the final centroids
        let o = KMeansOpts { k, n_iter: 30, seed: 5, balanced: false, init: Init::Random };
        let (c, a) = kmeans(&x, n, d, &o).unwrap();
        let mut plain = random_init(&x, n, d, k, 5);
        lloyd_plain(&x, n, d, k, &mut plain, 30);
        assert_eq!(c, plain);
        assert_eq!(a, nearest_impl(&x, n, d, &plain, k, false).0);
    }

    #[test]
    fn balanced_respects_capacity() {
        let (x, n, d) = blobs();
        let (_, a) = kmeans(&x, n, d, &KMeansOpts { k: 7, n_iter: 5, seed: 3, balanced: true, init: Init::KMeansPlusPlus }).unwrap();
        let mut cnt = [0usize; 7];
        a.iter().for_each(|&j| cnt[j as usize] += 1);
        assert!(cnt.iter().all(|&c| c <= 300usize.div_ceil(7)), "{cnt:?}");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(kmeans(&[1.0, f32::NAN], 1, 2, &KMeansOpts { k: 1, n_iter: 1, seed: 0, balanced: false, init: Init::KMeansPlusPlus }).is_err());
        assert!(kmeans(&[1.0, 2.0], 1, 2, &KMeansOpts { k: 2, n_iter: 1, seed: 0, balanced: false, init: Init::KMeansPlusPlus }).is_err());
    }

    #[test]
    fn report_counts_collisions() {
        // tuples: (0,1) (0,1) (0,1) (1,0) (2,2)
        let codes = [0, 1, 0, 1, 0, 1, 1, 0, 2, 2];
        let r = code_report(&codes, 5, 2, 4).unwrap();
        assert_eq!(r.n_unique_tuples, 3);
        assert_eq!(r.largest_collision_group, 3);
        assert!((r.collision_share - 0.6).abs() < 1e-12);
        assert_eq!(r.usage, vec![0.75, 0.75]);
    }
}
