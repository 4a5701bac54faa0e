//! Negative sampling: items a user never interacted with, uniformly or by popularity.

use crate::error::Result;
use crate::ensure;
use crate::rng::Rng;

/// Walker's alias table over item ids 1..=n (index 0 never drawn).
#[derive(Debug, Clone)]
pub struct AliasTable {
    prob: Vec<f64>,
    alias: Vec<u32>,
}

impl AliasTable {
    /// `weights[i]` is the weight of item `i + 1`; all finite, non-negative, not all zero.
    pub fn new(weights: &[f64]) -> Result<Self> {
        let n = weights.len();
        ensure!(n > 0, "popularity weights are empty");
        ensure!(weights.iter().all(|w| w.is_finite() && *w >= 0.0), "popularity weights must be finite and >= 0");
        let total: f64 = weights.iter().sum();
        ensure!(total > 0.0, "popularity weights are all zero");
        let mut prob: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut alias = vec![0u32; n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        for (i, &p) in prob.iter().enumerate() {
            if p < 1.0 { small.push(i) } else { large.push(i) }
        }
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            alias[s] = l as u32;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        for i in large.into_iter().chain(small) {
            prob[i] = 1.0;
        }
        Ok(AliasTable { prob, alias })
    }

    /// An item id in 1..=n.
    #[inline]
    pub fn draw(&self, rng: &mut Rng) -> u32 {
        let i = rng.below(self.prob.len() as u64) as usize;
        let j = if rng.unit_f64() < self.prob[i] { i } else { self.alias[i] as usize };
        j as u32 + 1
    }
}

/// Draws until an item outside `seen` (sorted, distinct) comes up. After `MAX_TRIES` misses (a
/// user who touched most of the catalogue, or most of its popularity mass) it picks uniformly
/// among the items not in `seen` by rank, so it always ends. Callers guarantee that `seen`
/// leaves at least one of the items 1..=n_items out.
const MAX_TRIES: usize = 64;

#[inline]
pub fn draw_unseen(seen: &[u32], n_items: u32, rng: &mut Rng, alias: Option<&AliasTable>) -> u32 {
    for _ in 0..MAX_TRIES {
        let cand = match alias {
            Some(a) => a.draw(rng),
            None => rng.below(n_items as u64) as u32 + 1,
        };
        if seen.binary_search(&cand).is_err() {
            return cand;
        }
    }
    nth_unseen(seen, rng.below((n_items as usize - seen.len()) as u64) as u32)
}

/// The `k`-th (0-based) item id in 1..=n that is not in the sorted list `seen`.
pub fn nth_unseen(seen: &[u32], k: u32) -> u32 {
    // Item `v` has `v - 1 - (#seen < v)` unseen items before it; walk the seen list.
    let mut cand = k + 1;
    for &s in seen {
        if s <= cand {
            cand += 1;
        } else {
            break;
        }
    }
    cand
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_unseen_matches_brute_force() {
        let seen = [2u32, 3, 7, 8, 9];
        let unseen: Vec<u32> = (1..=12).filter(|v| !seen.contains(v)).collect();
        for (k, &want) in unseen.iter().enumerate() {
            assert_eq!(nth_unseen(&seen, k as u32), want);
        }
    }

    #[test]
    fn alias_follows_weights() {
        let t = AliasTable::new(&[1.0, 0.0, 3.0]).unwrap();
        let mut r = Rng::stream(1, 2, 3, 4);
        let mut c = [0u32; 4];
        for _ in 0..40_000 {
            c[t.draw(&mut r) as usize] += 1;
        }
        assert_eq!(c[0], 0);
        assert_eq!(c[2], 0);
        assert!((9_000..11_000).contains(&c[1]), "{c:?}");
        assert!((29_000..31_000).contains(&c[3]), "{c:?}");
    }

    #[test]
    fn draw_unseen_never_returns_seen() {
        let seen = [1u32, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut r = Rng::stream(0, 0, 0, 0);
        for _ in 0..100 {
            assert_eq!(draw_unseen(&seen, 10, &mut r, None), 10);
        }
    }
}
