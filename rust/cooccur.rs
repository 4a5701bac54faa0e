//! Co-occurrence positives for the item-level alignment loss: item pairs that appear within a
//! window of each other in training prefixes, weighted by PPMI, top-k per item, as CSR.

use rayon::prelude::*;

use crate::csr::SequenceStore;
use crate::ensure;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct CooccurOpts {
    pub window: usize,
    pub top_k: usize,
    pub min_weight: f32,
    pub max_weight: f32,
    pub holdout: usize,
}

/// CSR over item ids 0..=n_items: `indptr` (n_items + 2), `indices`, `weights`, `counts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cooccurrence {
    pub indptr: Vec<i64>,
    pub indices: Vec<i64>,
    pub weights: Vec<f32>,
    pub counts: Vec<i64>,
}

pub fn cooccurrence(store: &SequenceStore, o: &CooccurOpts) -> Result<Cooccurrence> {
    ensure!(o.window >= 1, "window={} must be at least 1", o.window);
    ensure!(o.top_k >= 1, "top_k={} must be at least 1", o.top_k);
    ensure!(
        o.min_weight.is_finite() && o.max_weight.is_finite() && 0.0 <= o.min_weight && o.min_weight <= o.max_weight,
        "weights must satisfy 0 <= min_weight={} <= max_weight={}",
        o.min_weight,
        o.max_weight
    );
    let n_items = store.n_items() as usize;
    // 1. every ordered pair (a, b), a != b, within the window, as a u64 key a << 32 | b
    let per_user: Vec<Vec<u64>> = (0..store.n_users())
        .into_par_iter()
        .map(|u| {
            let s = store.seq(u);
            let p = &s[..s.len().saturating_sub(o.holdout)];
            let mut keys = Vec::new();
            for i in 0..p.len() {
                for j in i + 1..p.len().min(i + o.window + 1) {
                    let (a, b) = (p[i] as u64, p[j] as u64);
                    if a != b {
                        keys.push(a << 32 | b);
                        keys.push(b << 32 | a);
                    }
                }
            }
            keys
        })
        .collect();
    let mut keys: Vec<u64> = per_user.concat();
    keys.par_sort_unstable();
    // 2. run-length counts, grouped by row a
    let mut pairs: Vec<(u32, u32, u64)> = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let mut j = i + 1;
        while j < keys.len() && keys[j] == keys[i] {
            j += 1;
        }
        pairs.push(((keys[i] >> 32) as u32, keys[i] as u32, (j - i) as u64));
        i = j;
    }
    drop(keys);
    let mut row_sum = vec![0u64; n_items + 1];
    for &(a, _, c) in &pairs {
        row_sum[a as usize] += c;
    }
    let total: u64 = row_sum.iter().sum();
    let mut row_start = vec![0usize; n_items + 2];
    for &(a, _, _) in &pairs {
        row_start[a as usize + 1] += 1;
    }
    for r in 0..=n_items {
        row_start[r + 1] += row_start[r];
    }
    // 3. PPMI, top-k per row, weights scaled to [min_weight, max_weight] within the row
    let rows: Vec<Vec<(i64, f32, i64)>> = (0..=n_items)
        .into_par_iter()
        .map(|a| {
            let mut row: Vec<(u32, f64, u64)> = pairs[row_start[a]..row_start[a + 1]]
                .iter()
                .map(|&(_, b, c)| {
                    let pmi = ((c as f64) * (total as f64) / ((row_sum[a] as f64) * (row_sum[b as usize] as f64))).ln();
                    (b, pmi, c)
                })
                .filter(|&(_, pmi, _)| pmi > 0.0)
                .collect();
            row.sort_by(|x, y| y.1.total_cmp(&x.1).then(y.2.cmp(&x.2)).then(x.0.cmp(&y.0)));
            row.truncate(o.top_k);
            let (lo, hi) = match (row.last(), row.first()) {
                (Some(l), Some(h)) => (l.1, h.1),
                _ => (0.0, 0.0),
            };
            row.iter()
                .map(|&(b, pmi, c)| {
                    let w = if hi > lo {
                        o.min_weight as f64 + (o.max_weight - o.min_weight) as f64 * (pmi - lo) / (hi - lo)
                    } else {
                        o.max_weight as f64
                    };
                    (b as i64, w as f32, c as i64)
                })
                .collect()
        })
        .collect();
    let mut indptr = Vec::with_capacity(n_items + 2);
    indptr.push(0i64);
    let (mut indices, mut weights, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for (b, w, c) in r {
            indices.push(b);
            weights.push(w);
            counts.push(c);
        }
        indptr.push(indices.len() as i64);
    }
    Ok(Cooccurrence { indptr, indices, weights, counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_counts() {
        // training prefixes (holdout 0): [1,2,3] and [2,3]; window 1
        let s = SequenceStore::from_sequences(&[vec![1, 2, 3], vec![2, 3]], Some(4)).unwrap();
        let o = CooccurOpts { window: 1, top_k: 10, min_weight: 0.3, max_weight: 1.0, holdout: 0 };
        let c = cooccurrence(&s, &o).unwrap();
        // pair counts: (1,2)=1 (2,1)=1 (2,3)=2 (3,2)=2; row sums: 1:1 2:3 3:2; total 6
        // pmi(1,2)=ln(1*6/(1*3))=ln 2, pmi(2,3)=ln(2*6/(3*2))=ln 2: every row's PPMIs are equal
        assert_eq!(c.indptr, vec![0, 0, 1, 3, 4, 4]);
        // row 2: items 1 and 3 tie on PPMI ln 2; the larger count (item 3) comes first
        assert_eq!(c.indices, vec![2, 3, 1, 2]);
        assert_eq!(c.counts, vec![1, 2, 1, 2]);
        assert!(c.weights.iter().all(|&w| (0.3..=1.0).contains(&w)));
    }
}
