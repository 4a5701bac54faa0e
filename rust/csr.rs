//! The CSR store of users' chronological item sequences, validated once at construction.

use std::fmt;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::Result;
use crate::{ensure, invalid};

/// Read-only memory the store reads its arrays from: a `Vec` it owns, or a buffer it borrows
/// (a memory-mapped `.npy` opened read-only by the Python side), kept alive by the owner.
pub trait Backing<T>: Send + Sync {
    fn slice(&self) -> &[T];
}

impl<T: Send + Sync> Backing<T> for Vec<T> {
    fn slice(&self) -> &[T] {
        self
    }
}

/// A shared read-only array: cloning shares the memory.
#[derive(Clone)]
pub struct Shared<T: 'static>(Arc<dyn Backing<T>>);

impl<T: Send + Sync + 'static> Shared<T> {
    pub fn owned(v: Vec<T>) -> Self {
        Shared(Arc::new(v))
    }
    pub fn new(b: Arc<dyn Backing<T>>) -> Self {
        Shared(b)
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.slice()
    }
}

impl<T> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shared(len={})", self.0.slice().len())
    }
}

/// A validated signed buffer read as the unsigned type of the same width (`i64` offsets as
/// `usize`, `i32` item ids as `u32`): the store checks every value is non-negative first.
struct Unsigned<S: 'static>(Arc<dyn Backing<S>>);

macro_rules! unsigned_view {
    ($s:ty, $t:ty) => {
        const _: () = assert!(std::mem::size_of::<$s>() == std::mem::size_of::<$t>());
        impl Backing<$t> for Unsigned<$s> {
            fn slice(&self) -> &[$t] {
                let s = self.0.slice();
                // SAFETY: same size and alignment, and every value was checked non-negative
                // before the view was made, so each reads as the same number.
                unsafe { std::slice::from_raw_parts(s.as_ptr() as *const $t, s.len()) }
            }
        }
    };
}
unsigned_view!(i64, usize);
unsigned_view!(i32, u32);

/// Users' item sequences: user `u` owns `items[offsets[u]..offsets[u + 1]]`, oldest first.
/// Items are 1..=n_items (0 is padding and never stored). Each user's distinct items are also
/// kept sorted, for O(log h) "has the user touched this item" checks on the sampling hot path.
/// The two CSR arrays are either owned or borrowed (see [`SequenceStore::borrowed`]); the
/// sorted distinct histories are always the store's own, one `u32` per distinct item.
#[derive(Debug, Clone)]
pub struct SequenceStore {
    offsets: Shared<usize>,
    items: Shared<u32>,
    n_items: u32,
    seen_offsets: Vec<usize>,
    seen: Vec<u32>,
    borrowed: bool,
}

/// Checks CSR offsets against the number of items they index.
fn check_offsets(offsets: &[i64], n_values: usize) -> Result<()> {
    ensure!(!offsets.is_empty(), "offsets is empty; it needs n_users + 1 entries starting at 0");
    ensure!(offsets[0] == 0, "offsets[0]={} must be 0", offsets[0]);
    if let Some(u) = (0..offsets.len() - 1).find(|&u| offsets[u + 1] < offsets[u]) {
        return Err(invalid!(
            "offsets are not monotone: offsets[{}]={} < offsets[{}]={}",
            u + 1,
            offsets[u + 1],
            u,
            offsets[u]
        ));
    }
    let last = offsets[offsets.len() - 1];
    ensure!(last as u64 == n_values as u64, "offsets[-1]={last} must equal len(items)={n_values}");
    Ok(())
}

/// Checks item ids are 1..=n_items (`n_items` defaults to the largest id) and returns n_items.
fn check_items<T: Copy + Into<i64> + Send + Sync>(items: &[T], n_items: Option<i64>) -> Result<u32> {
    let max_item = items.par_iter().map(|&v| v.into()).max().unwrap_or(0);
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
    let bad = items.par_iter().position_first(|&v| {
        let v: i64 = v.into();
        v < 1 || v > n_items
    });
    if let Some(i) = bad {
        let v: i64 = items[i].into();
        return Err(if v < 1 {
            invalid!("items[{i}]={v} is not a valid item id (ids start at 1; 0 is padding)")
        } else {
            invalid!("items[{i}]={v} > n_items={n_items}")
        });
    }
    Ok(n_items as u32)
}

impl SequenceStore {
    /// Validates CSR arrays and copies them in. `n_items` defaults to the largest item id.
    pub fn new(offsets: &[i64], items: &[i64], n_items: Option<i64>) -> Result<Self> {
        check_offsets(offsets, items.len())?;
        let n_items = check_items(items, n_items)?;
        let offsets: Vec<usize> = offsets.iter().map(|&o| o as usize).collect();
        let items: Vec<u32> = items.iter().map(|&v| v as u32).collect();
        Ok(Self::from_parts(Shared::owned(offsets), Shared::owned(items), n_items, false))
    }

    /// Validates CSR arrays held elsewhere (`i64` offsets, `i32` item ids) and reads them in
    /// place, without a copy: the store keeps `offsets` and `items` alive and never writes.
    pub fn borrowing(
        offsets: Arc<dyn Backing<i64>>,
        items: Arc<dyn Backing<i32>>,
        n_items: Option<i64>,
    ) -> Result<Self> {
        check_offsets(offsets.slice(), items.slice().len())?;
        let n_items = check_items(items.slice(), n_items)?;
        let offsets = Shared::new(Arc::new(Unsigned(offsets)));
        let items = Shared::new(Arc::new(Unsigned(items)));
        Ok(Self::from_parts(offsets, items, n_items, true))
    }

    /// Builds from already checked parts and derives the sorted distinct histories: one copy
    /// of the items, each user's run sorted and deduplicated in place, then compacted.
    fn from_parts(offsets: Shared<usize>, items: Shared<u32>, n_items: u32, borrowed: bool) -> Self {
        let n_users = offsets.len() - 1;
        let mut seen: Vec<u32> = items.to_vec();
        let mut runs: Vec<&mut [u32]> = Vec::with_capacity(n_users);
        let mut rest: &mut [u32] = &mut seen;
        for u in 0..n_users {
            let (head, tail) = rest.split_at_mut(offsets[u + 1] - offsets[u]);
            runs.push(head);
            rest = tail;
        }
        let distinct: Vec<usize> = runs
            .into_par_iter()
            .map(|run| {
                run.sort_unstable();
                let mut k = 0;
                for i in 0..run.len() {
                    if i == 0 || run[i] != run[k - 1] {
                        run[k] = run[i];
                        k += 1;
                    }
                }
                k
            })
            .collect();
        let mut seen_offsets = Vec::with_capacity(n_users + 1);
        seen_offsets.push(0);
        let mut end = 0;
        for (u, &k) in distinct.iter().enumerate() {
            seen.copy_within(offsets[u]..offsets[u] + k, end);
            end += k;
            seen_offsets.push(end);
        }
        seen.truncate(end);
        seen.shrink_to_fit();
        SequenceStore { offsets, items, n_items, seen_offsets, seen, borrowed }
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

    /// Whether the CSR arrays are read in place from memory the store does not own.
    pub fn borrowed(&self) -> bool {
        self.borrowed
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
    fn borrowed_arrays_read_as_the_copied_ones() {
        let (o, it) = (vec![0i64, 5, 8, 14], vec![3i64, 1, 2, 3, 5, 4, 4, 2, 1, 2, 3, 4, 5, 6]);
        let it32: Vec<i32> = it.iter().map(|&v| v as i32).collect();
        let b = SequenceStore::borrowing(Arc::new(o.clone()), Arc::new(it32), None).unwrap();
        let c = SequenceStore::new(&o, &it, None).unwrap();
        assert!(b.borrowed() && !c.borrowed());
        assert_eq!((b.n_users(), b.n_items(), b.n_interactions()), (3, 6, 14));
        for u in 0..3 {
            assert_eq!(b.seq(u), c.seq(u));
            assert_eq!(b.seen(u), c.seen(u));
        }
        assert_eq!(b.seen(1), &[2, 4]);
        assert_eq!(b.offsets(), &[0, 5, 8, 14]);
        // negative values are refused before they could be read as huge unsigned ones
        let e = SequenceStore::borrowing(Arc::new(vec![0i64, 2]), Arc::new(vec![1i32, -3]), None);
        assert_eq!(e.unwrap_err().to_string(), "items[1]=-3 is not a valid item id (ids start at 1; 0 is padding)");
        let e = SequenceStore::borrowing(Arc::new(vec![0i64, -1, 2]), Arc::new(vec![1i32, 2]), None);
        assert!(e.unwrap_err().to_string().starts_with("offsets are not monotone: offsets[1]=-1"));
        assert!(SequenceStore::borrowing(Arc::new(vec![0i64, 3]), Arc::new(vec![1i32, 2]), None).is_err());
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
