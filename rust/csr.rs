//! The CSR store of users' chronological item sequences, validated once at construction.

use rayon::prelude::*;

use crate::error::Result;
use crate::{ensure, invalid};

/// Users' item sequences: user `u` owns `items[offsets[u]..offsets[u + 1]]`, oldest first.
/// Items are 1..=n_items (0 is padding and never stored). Each user's distinct items are also
/// kept sorted, for O(log h) "has the user touched this item" checks on the sampling hot path.
#[derive(Debug, Clone)]
pub struct SequenceStore {
    offsets: Vec<usize>,
    items: Vec<u32>,
    n_items: u32,
    seen_offsets: Vec<usize>,
    seen: Vec<u32>,
}

impl SequenceStore {
    /// Validates CSR arrays. `n_items` defaults to the largest item id.
    pub fn new(offsets: &[i64], items: &[i64], n_items: Option<i64>) -> Result<Self> {
        ensure!(!offsets.is_empty(), "offsets is empty; it needs n_users + 1 entries starting at 0");
        ensure!(offsets[0] == 0, "offsets[0]={} must be 0", offsets[0]);
        for u in 0..offsets.len() - 1 {
            ensure!(
                offsets[u + 1] >= offsets[u],
                "offsets are not monotone: offsets[{}]={} < offsets[{}]={}",
                u + 1,
                offsets[u + 1],
                u,
                offsets[u]
            );
        }
        let last = offsets[offsets.len() - 1];
        ensure!(
            last as u64 == items.len() as u64,
            "offsets[-1]={last} must equal len(items)={}",
            items.len()
        );
        let max_item = items.iter().copied().max().unwrap_or(0);
        let n_items = match n_items {
            Some(n) => {
                ensure!((1..=u32::MAX as i64 - 1).contains(&n), "n_items={n} must be in 1..2^32-1");
                n
            }
            None => {
                ensure!(max_item >= 1, "items is empty; pass n_items to build an empty store");
                max_item
            }
        };
        ensure!(n_items < u32::MAX as i64, "n_items={n_items} is too large (at most 2^32-2)");
        if let Some((i, &v)) = items.iter().enumerate().find(|(_, &v)| v < 1 || v > n_items) {
            return Err(if v < 1 {
                invalid!("items[{i}]={v} is not a valid item id (ids start at 1; 0 is padding)")
            } else {
                invalid!("items[{i}]={v} > n_items={n_items}")
            });
        }
        let offsets: Vec<usize> = offsets.iter().map(|&o| o as usize).collect();
        let items: Vec<u32> = items.iter().map(|&v| v as u32).collect();
        Ok(Self::from_parts(offsets, items, n_items as u32))
    }

    /// Builds from already checked parts and derives the sorted distinct histories.
    fn from_parts(offsets: Vec<usize>, items: Vec<u32>, n_items: u32) -> Self {
        let sorted: Vec<Vec<u32>> = (0..offsets.len() - 1)
            .into_par_iter()
            .map(|u| {
                let mut s = items[offsets[u]..offsets[u + 1]].to_vec();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let mut seen_offsets = Vec::with_capacity(offsets.len());
        seen_offsets.push(0);
        let mut seen = Vec::with_capacity(items.len());
        for s in &sorted {
            seen.extend_from_slice(s);
            seen_offsets.push(seen.len());
        }
        SequenceStore { offsets, items, n_items, seen_offsets, seen }
    }

    /// Builds from one list of item ids per user.
    pub fn from_sequences(seqs: &[Vec<i64>], n_items: Option<i64>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0i64);
        let mut items = Vec::new();
        for s in seqs {
            items.extend_from_slice(s);
            offsets.push(items.len() as i64);
        }
        Self::new(&offsets, &items, n_items)
    }

    pub fn n_users(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn n_items(&self) -> u32 {
        self.n_items
    }
    pub fn n_interactions(&self) -> usize {
        self.items.len()
    }
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }
    pub fn items(&self) -> &[u32] {
        &self.items
    }

    /// The chronological sequence of user row `u` (caller checks `u < n_users`).
    #[inline]
    pub fn seq(&self, u: usize) -> &[u32] {
        &self.items[self.offsets[u]..self.offsets[u + 1]]
    }

    /// The user's distinct items, sorted.
    #[inline]
    pub fn seen(&self, u: usize) -> &[u32] {
        &self.seen[self.seen_offsets[u]..self.seen_offsets[u + 1]]
    }

    #[inline]
    pub fn has_seen(&self, u: usize, item: u32) -> bool {
        self.seen(u).binary_search(&item).is_ok()
    }

    pub fn len(&self, u: usize) -> usize {
        self.offsets[u + 1] - self.offsets[u]
    }

    pub fn check_user(&self, name: &str, i: usize, u: i64) -> Result<usize> {
        ensure!(
            u >= 0 && (u as u64) < self.n_users() as u64,
            "{name}[{i}]={u} is not a user row (0..{})",
            self.n_users()
        );
        Ok(u as usize)
    }

    /// Interaction count per item id (index 0 stays 0), leaving out each user's last `holdout`.
    pub fn popularity(&self, holdout: usize) -> Vec<i64> {
        let mut pop = vec![0i64; self.n_items as usize + 1];
        for u in 0..self.n_users() {
            let s = self.seq(u);
            for &it in &s[..s.len().saturating_sub(holdout)] {
                pop[it as usize] += 1;
            }
        }
        pop
    }

    /// Left-padded evaluation inputs `(B * max_len)` and targets `(B)` of the leave-one-out split.
    /// `test`: input = all but the last item; otherwise (validation) all but the last two.
    pub fn eval_inputs(&self, users: &[i64], max_len: usize, test: bool) -> Result<(Vec<i64>, Vec<i64>)> {
        ensure!(max_len >= 1, "max_len={max_len} must be at least 1");
        let drop = if test { 1 } else { 2 };
        let mut rows = Vec::with_capacity(users.len());
        for (i, &u) in users.iter().enumerate() {
            let u = self.check_user("users", i, u)?;
            let n = self.len(u);
            ensure!(
                n >= 3,
                "user row {u} has {n} items; the leave-one-out split needs at least 3 (train, valid, test)"
            );
            rows.push(u);
        }
        let mut inputs = vec![0i64; users.len() * max_len];
        let mut targets = vec![0i64; users.len()];
        inputs
            .par_chunks_mut(max_len)
            .zip(targets.par_iter_mut())
            .zip(rows.par_iter())
            .for_each(|((row, t), &u)| {
                let s = self.seq(u);
                let input = &s[..s.len() - drop];
                *t = s[s.len() - drop] as i64;
                let k = input.len().min(max_len);
                for (dst, &src) in row[max_len - k..].iter_mut().zip(&input[input.len() - k..]) {
                    *dst = src as i64;
                }
            });
        Ok((inputs, targets))
    }

    /// CSR of the given users' sequences without their last `holdout` items.
    pub fn histories(&self, users: &[i64], holdout: usize) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut ptr = Vec::with_capacity(users.len() + 1);
        ptr.push(0i64);
        let mut out = Vec::new();
        for (i, &u) in users.iter().enumerate() {
            let u = self.check_user("users", i, u)?;
            let s = self.seq(u);
            out.extend(s[..s.len().saturating_sub(holdout)].iter().map(|&v| v as i64));
            ptr.push(out.len() as i64);
        }
        Ok((ptr, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SequenceStore {
        SequenceStore::from_sequences(&[vec![3, 1, 2, 3, 5], vec![4, 4, 2], vec![1, 2, 3, 4, 5, 6]], None).unwrap()
    }

    #[test]
    fn builds_and_validates() {
        let s = store();
        assert_eq!((s.n_users(), s.n_items(), s.n_interactions()), (3, 6, 14));
        assert_eq!(s.seen(0), &[1, 2, 3, 5]);
        assert!(s.has_seen(1, 4) && !s.has_seen(1, 1));
        assert!(SequenceStore::new(&[0, 2, 1], &[1, 2], None).is_err());
        assert!(SequenceStore::new(&[1, 2], &[1, 2], None).is_err());
        assert!(SequenceStore::new(&[0, 2], &[1, 0], None).is_err());
        assert!(SequenceStore::new(&[0, 2], &[1, 9], Some(5)).is_err());
        assert!(SequenceStore::new(&[0, 3], &[1, 2], None).is_err());
    }

    #[test]
    fn popularity_with_holdout() {
        let s = store();
        assert_eq!(s.popularity(0), vec![0, 2, 3, 3, 3, 2, 1]);
        // training prefixes: [3,1,2], [4], [1,2,3,4]
        assert_eq!(s.popularity(2), vec![0, 2, 2, 2, 2, 0, 0]);
    }

    #[test]
    fn eval_inputs_left_pad() {
        let s = store();
        let (inp, tgt) = s.eval_inputs(&[0, 2], 4, false).unwrap();
        assert_eq!(inp, vec![0, 3, 1, 2, 1, 2, 3, 4]);
        assert_eq!(tgt, vec![3, 5]);
        let (inp, tgt) = s.eval_inputs(&[2], 3, true).unwrap();
        assert_eq!(inp, vec![3, 4, 5]);
        assert_eq!(tgt, vec![6]);
        assert!(s.eval_inputs(&[3], 3, true).is_err());
    }
}
