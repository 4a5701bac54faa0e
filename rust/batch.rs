//! Training batches: each user's training prefix (all but the last two items), left-padded,
//! with the next item as target at every position and sampled negatives.
//!
//! A row of a batch is one *window* of a user's prefix: its last `max_len` positions (window 0),
//! and, with `windows`, the `max_len` positions before those (window 1), and so on down to the
//! first, so that every training interaction of a long history is a target once an epoch;
//! without `windows` (SASRec's protocol) a user is the one row of window 0.
//!
//! Negatives are drawn from the items outside the user's *training prefix*: the held-out
//! validation and test items are unknown to training, so they may come up as negatives like any
//! other item (as in SASRec's sampler). Excluding them would tell the model, through the
//! negatives, which items the user goes on to choose.

use rayon::prelude::*;

use crate::csr::SequenceStore;
use crate::ensure;
use crate::error::Result;
use crate::negative::{draw_unseen, AliasTable};
use crate::rng::{Rng, TAG_BUCKETS, TAG_SHUFFLE, TAG_TRAIN_NEG};

/// Items held out of each user's training prefix (validation + test).
pub const HOLDOUT: usize = 2;

#[derive(Debug, Clone)]
pub struct SamplerConfig {
    pub max_len: usize,
    pub batch_size: usize,
    pub n_negatives: usize,
    pub seed: u64,
    pub popularity: bool,
    pub last_only: bool,
    pub skip_short: bool,
    /// Length buckets: users are sorted by training length inside windows of this many batches
    /// of the shuffled order, and the full batches are then shuffled; 0 = plain shuffle.
    pub bucket_batches: usize,
    /// Cut every batch to its longest row (left padding kept), instead of `max_len` columns.
    pub trim: bool,
    /// Every window of `max_len` positions of a long prefix is a row, not only the last one.
    pub windows: bool,
}

/// One batch, row-major: inputs and targets `(B, T)`, negatives `(B, T, n)`; `T` is `max_len`,
/// or the longest row's positions when the sampler trims.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub width: usize,
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub negatives: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct TrainSampler {
    cfg: SamplerConfig,
    /// User rows with at least one training position (prefix of 2 or more items).
    users: Vec<u32>,
    /// The rows of an epoch before shuffling: (user row, window), window 0 the last positions;
    /// users in order, each user's windows from 0 up.
    rows: Vec<(u32, u32)>,
    alias: Option<AliasTable>,
    /// Sorted distinct training-prefix items per user row (CSR), the negatives' exclusions.
    seen_offsets: Vec<usize>,
    seen: Vec<u32>,
}

impl TrainSampler {
    pub fn new(store: &SequenceStore, cfg: SamplerConfig) -> Result<Self> {
        ensure!(cfg.max_len >= 1, "max_len={} must be at least 1", cfg.max_len);
        ensure!(cfg.batch_size >= 1, "batch_size={} must be at least 1", cfg.batch_size);
        ensure!(cfg.n_negatives >= 1, "n_negatives={} must be at least 1", cfg.n_negatives);
        let mut users = Vec::with_capacity(store.n_users());
        let mut seen_offsets = Vec::with_capacity(store.n_users() + 1);
        seen_offsets.push(0);
        let mut seen = Vec::new();
        for u in 0..store.n_users() {
            let s = store.seq(u);
            let mut p = s[..s.len().saturating_sub(HOLDOUT)].to_vec();
            p.sort_unstable();
            p.dedup();
            seen.extend_from_slice(&p);
            seen_offsets.push(seen.len());
            let n = store.len(u);
            if n < HOLDOUT + 1 {
                ensure!(
                    cfg.skip_short,
                    "user row {u} has {n} items; the leave-one-out split needs at least 3 \
                     (pass skip_short=True to leave such users out)"
                );
                continue;
            }
            ensure!(
                p.len() < store.n_items() as usize,
                "user row {u} has all {} items in its training prefix, so no negative can be drawn",
                store.n_items()
            );
            if n >= HOLDOUT + 2 {
                users.push(u as u32);
            }
        }
        ensure!(!users.is_empty(), "no user has a training prefix of 2 or more items");
        let mut rows = Vec::with_capacity(users.len());
        for &u in &users {
            let n_windows = if cfg.windows {
                (store.len(u as usize) - HOLDOUT - 1).div_ceil(cfg.max_len)
            } else {
                1
            };
            ensure!(
                n_windows <= u32::MAX as usize,
                "user row {u} has {n_windows} windows, more than a row index holds"
            );
            rows.extend((0..n_windows as u32).map(|w| (u, w)));
        }
        ensure!(
            rows.len() <= u32::MAX as usize,
            "{} training rows, more than a row index holds",
            rows.len()
        );
        let alias = if cfg.popularity {
            let pop = store.popularity(HOLDOUT);
            let w: Vec<f64> = pop[1..].iter().map(|&c| c as f64).collect();
            Some(AliasTable::new(&w)?)
        } else {
            None
        };
        Ok(TrainSampler { cfg, users, rows, alias, seen_offsets, seen })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }
    pub fn n_users(&self) -> usize {
        self.users.len()
    }
    /// Rows of an epoch: the users, or with `windows` their windows.
    pub fn n_rows(&self) -> usize {
        self.rows.len()
    }
    pub fn n_batches(&self) -> usize {
        self.rows.len().div_ceil(self.cfg.batch_size)
    }
    /// The user row of row `r` of an epoch (an entry of `permutation`).
    pub fn user_of(&self, r: u32) -> u32 {
        self.rows[r as usize].0
    }

    /// The first position and the number of positions of window `w` of user row `u`: positions
    /// are the prefix's transitions 0..P (P = prefix length - 1); window 0 is the last
    /// `min(P, max_len)` of them, window w the `max_len` before window w - 1 (the first one may
    /// be shorter).
    fn window(&self, store: &SequenceStore, u: u32, w: u32) -> (usize, usize) {
        let p = store.len(u as usize) - HOLDOUT - 1;
        let end = p - (w as usize * self.cfg.max_len).min(p);
        let k = end.min(self.cfg.max_len);
        (end - k, k)
    }

    /// Training positions of row `r` (at most `max_len`).
    fn positions(&self, store: &SequenceStore, r: u32) -> usize {
        let (u, w) = self.rows[r as usize];
        self.window(store, u, w).1
    }

    /// The rows of one epoch (indices into the rows: users, or their windows) in batch order,
    /// shuffled by (seed, epoch).
    ///
    /// With length buckets, each window of `bucket_batches` batches of the shuffled order is
    /// sorted by training length (longest first, stable), cut into batches, and the full batches
    /// of the whole epoch are shuffled by a second stream of (seed, epoch); the last, partial
    /// batch stays last. Rows in a batch then have similar lengths, so trimmed batches carry
    /// little padding, and the order is still a pure function of (seed, epoch).
    pub fn permutation(&self, store: &SequenceStore, epoch: u64) -> Vec<u32> {
        let mut p: Vec<u32> = (0..self.rows.len() as u32).collect();
        Rng::stream(self.cfg.seed, TAG_SHUFFLE, epoch, 0).shuffle(&mut p);
        if self.cfg.bucket_batches == 0 {
            return p;
        }
        let bs = self.cfg.batch_size;
        for window in p.chunks_mut(self.cfg.bucket_batches.saturating_mul(bs)) {
            window.sort_by_key(|&r| std::cmp::Reverse(self.positions(store, r)));
        }
        let n_full = p.len() / bs;
        let mut order: Vec<usize> = (0..n_full).collect();
        Rng::stream(self.cfg.seed, TAG_BUCKETS, epoch, 0).shuffle(&mut order);
        let mut out = Vec::with_capacity(p.len());
        for b in order {
            out.extend_from_slice(&p[b * bs..(b + 1) * bs]);
        }
        out.extend_from_slice(&p[n_full * bs..]);
        out
    }

    /// The rows of the epoch's permutation that `rank` out of `world_size` trains on, one range
    /// per step; every rank gets the same number of steps and every user is trained exactly
    /// once per epoch across the ranks.
    ///
    /// Step i gives rank r batch `i * world_size + r` of the permutation (so length buckets keep
    /// their batches whole). The last round, where fewer batches than ranks are left, is split
    /// into `world_size` contiguous slices of nearly equal size instead of being padded with
    /// repeated batches; when it holds fewer users than ranks it is merged with the round
    /// before (slices then hold at most `batch_size + 1` users). With one process the ranges
    /// are the batches.
    pub fn rank_ranges(&self, rank: usize, world_size: usize) -> Result<Vec<(usize, usize)>> {
        ensure!(world_size >= 1, "world_size={world_size} must be at least 1");
        ensure!(rank < world_size, "rank={rank} must be below world_size={world_size}");
        let (n, bs) = (self.rows.len(), self.cfg.batch_size);
        ensure!(
            n >= world_size,
            "{n} training rows cannot be shared by world_size={world_size} processes"
        );
        let nb = self.n_batches();
        let mut rounds = nb.div_ceil(world_size);
        // users left for the last round: it starts at batch (rounds - 1) * world_size
        let mut tail_start = (rounds - 1) * world_size * bs;
        if n - tail_start < world_size && rounds > 1 {
            rounds -= 1;
            tail_start = (rounds - 1) * world_size * bs;
        }
        let mut out = Vec::with_capacity(rounds);
        for i in 0..rounds - 1 {
            let b = i * world_size + rank;
            out.push((b * bs, (b + 1) * bs));
        }
        // the last round: n - tail_start users in world_size slices, the first ones one longer
        let m = n - tail_start;
        let (q, extra) = (m / world_size, m % world_size);
        let start = tail_start + rank * q + rank.min(extra);
        out.push((start, start + q + usize::from(rank < extra)));
        Ok(out)
    }

    /// Number of steps each of `world_size` ranks takes in an epoch (see `rank_ranges`).
    pub fn rank_steps(&self, world_size: usize) -> Result<usize> {
        Ok(self.rank_ranges(0, world_size)?.len())
    }

    /// Builds batch `b` of an epoch whose permutation is `perm`.
    pub fn batch(&self, store: &SequenceStore, perm: &[u32], epoch: u64, b: usize) -> Batch {
        let bs = self.cfg.batch_size;
        self.batch_rows(store, perm, epoch, b * bs, ((b + 1) * bs).min(perm.len()))
    }

    /// Builds the batch of rows `start..end` of an epoch whose permutation is `perm`.
    pub fn batch_rows(&self, store: &SequenceStore, perm: &[u32], epoch: u64, start: usize, end: usize) -> Batch {
        let rows = &perm[start..end];
        let n = self.cfg.n_negatives;
        let t = if self.cfg.trim {
            rows.iter().map(|&u| self.positions(store, u)).max().unwrap_or(0)
        } else {
            self.cfg.max_len
        };
        let mut inputs = vec![0i64; rows.len() * t];
        let mut targets = vec![0i64; rows.len() * t];
        let mut negatives = vec![0i64; rows.len() * t * n];
        if t > 0 {
            inputs
                .par_chunks_mut(t)
                .zip(targets.par_chunks_mut(t))
                .zip(negatives.par_chunks_mut(t * n))
                .zip(rows.par_iter())
                .for_each(|(((inp, tgt), neg), &r)| self.fill_row(store, r, epoch, inp, tgt, neg));
        }
        Batch { rows: rows.len(), width: t, inputs, targets, negatives }
    }

    fn fill_row(&self, store: &SequenceStore, r: u32, epoch: u64, inp: &mut [i64], tgt: &mut [i64], neg: &mut [i64]) {
        let (t, n) = (inp.len(), self.cfg.n_negatives);
        let (user, w) = self.rows[r as usize];
        let u = user as usize;
        let s = store.seq(u);
        let prefix = &s[..s.len() - HOLDOUT];
        // positions: input prefix[i] predicts prefix[i + 1]
        let (start, k) = self.window(store, user, w); // t >= k (max_len, or the batch's longest)
        // window 0 draws from the user's stream, as before windows existed; window w > 0 from
        // the stream of (w, user)
        let key = ((w as u64) << 32) | u as u64;
        let mut rng = Rng::stream(self.cfg.seed, TAG_TRAIN_NEG, epoch, key);
        let seen = &self.seen[self.seen_offsets[u]..self.seen_offsets[u + 1]];
        for j in 0..k {
            let pos = t - k + j;
            inp[pos] = prefix[start + j] as i64;
            if self.cfg.last_only && j + 1 != k {
                continue;
            }
            tgt[pos] = prefix[start + j + 1] as i64;
            for m in 0..n {
                neg[pos * n + m] = draw_unseen(seen, store.n_items(), &mut rng, self.alias.as_ref()) as i64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_len: usize, batch_size: usize) -> SamplerConfig {
        SamplerConfig { max_len, batch_size, n_negatives: 2, seed: 5, popularity: false, last_only: false, skip_short: false, bucket_batches: 0, trim: false, windows: false }
    }

    #[test]
    fn hand_worked_row() {
        // user 0: prefix [1,2,3,4] (5,6 held out) -> inputs [1,2,3], targets [2,3,4]
        let s = SequenceStore::from_sequences(&[vec![1, 2, 3, 4, 5, 6]], Some(20)).unwrap();
        let smp = TrainSampler::new(&s, cfg(5, 4)).unwrap();
        let perm = smp.permutation(&s, 0);
        let b = smp.batch(&s, &perm, 0, 0);
        assert_eq!(b.inputs, vec![0, 0, 1, 2, 3]);
        assert_eq!(b.targets, vec![0, 0, 2, 3, 4]);
        assert_eq!(&b.negatives[..4], &[0, 0, 0, 0]);
        // negatives avoid the training prefix 1..=4 only: the held-out 5 and 6 may come up
        for &x in &b.negatives[4..] {
            assert!(x > 4 && x <= 20);
        }
        // truncated to the last 2 positions
        let smp = TrainSampler::new(&s, cfg(2, 4)).unwrap();
        let b = smp.batch(&s, &smp.permutation(&s, 0), 0, 0);
        assert_eq!(b.inputs, vec![2, 3]);
        assert_eq!(b.targets, vec![3, 4]);
    }

    #[test]
    fn held_out_items_can_be_negatives() {
        // prefix [1, 2, 3]; 4 (valid) and 5 (test) are unknown to training, 6 never seen
        let s = SequenceStore::from_sequences(&[vec![1, 2, 3, 4, 5]], Some(6)).unwrap();
        let smp = TrainSampler::new(&s, cfg(5, 1)).unwrap();
        let mut drawn = [false; 7];
        for e in 0..200 {
            let b = smp.batch(&s, &smp.permutation(&s, e), e, 0);
            for &x in b.negatives.iter().filter(|&&x| x != 0) {
                drawn[x as usize] = true;
            }
        }
        assert_eq!(drawn, [false, false, false, false, true, true, true]);
    }

    #[test]
    fn short_users_and_ranks() {
        let s = SequenceStore::from_sequences(&[vec![1, 2], vec![1, 2, 3, 4]], Some(9)).unwrap();
        assert!(TrainSampler::new(&s, cfg(3, 1)).is_err());
        let mut c = cfg(3, 1);
        c.skip_short = true;
        let smp = TrainSampler::new(&s, c).unwrap();
        assert_eq!(smp.n_users(), 1);
        // one training user cannot be shared by two processes
        assert!(smp.rank_ranges(1, 2).is_err());
        assert_eq!(smp.rank_ranges(0, 1).unwrap(), vec![(0, 1)]);
    }

    #[test]
    fn ranks_train_every_user_once() {
        // 23 users in batches of 4: 6 batches; the oracle is a count of each permutation row
        let seqs: Vec<Vec<i64>> = (0..23i64).map(|u| (1..=(4 + u % 5)).collect()).collect();
        let s = SequenceStore::from_sequences(&seqs, Some(9)).unwrap();
        let smp = TrainSampler::new(&s, cfg(3, 4)).unwrap();
        for world in 1..=7usize {
            let mut seen = vec![0u32; smp.n_users()];
            let steps = smp.rank_steps(world).unwrap();
            for rank in 0..world {
                let r = smp.rank_ranges(rank, world).unwrap();
                assert_eq!(r.len(), steps, "world {world} rank {rank}");
                for &(a, b) in &r {
                    assert!(b > a && b - a <= 4 + 1, "world {world}: slice {a}..{b}");
                    for x in &mut seen[a..b] {
                        *x += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "world {world}: {seen:?}");
        }
        // one process: exactly the batches
        let one = smp.rank_ranges(0, 1).unwrap();
        assert_eq!(one, vec![(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]);
        // two: batches 0, 2 and 1, 3 whole, then the last 7 users split 4 + 3
        assert_eq!(smp.rank_ranges(0, 2).unwrap(), vec![(0, 4), (8, 12), (16, 20)]);
        assert_eq!(smp.rank_ranges(1, 2).unwrap(), vec![(4, 8), (12, 16), (20, 23)]);
        // five: one round of batches, then 3 users for 5 ranks: merged with the round before
        assert_eq!(smp.rank_steps(5).unwrap(), 1);
        assert_eq!(smp.rank_ranges(0, 5).unwrap(), vec![(0, 5)]);
        assert_eq!(smp.rank_ranges(4, 5).unwrap(), vec![(19, 23)]);
    }

    #[test]
    fn buckets_and_trim() {
        let seqs: Vec<Vec<i64>> = (0..50i64).map(|u| (1..=(4 + (u * 7) % 30)).collect()).collect();
        let s = SequenceStore::from_sequences(&seqs, Some(40)).unwrap();
        let plain = TrainSampler::new(&s, cfg(20, 8)).unwrap();
        let mut c = cfg(20, 8);
        c.bucket_batches = 3;
        c.trim = true;
        let smp = TrainSampler::new(&s, c).unwrap();
        for e in 0..3 {
            let perm = smp.permutation(&s, e);
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..50).collect::<Vec<u32>>(), "a permutation of the users");
            assert_eq!(perm, smp.permutation(&s, e), "a pure function of (seed, epoch)");
            for b in 0..smp.n_batches() {
                let cut = smp.batch(&s, &perm, e, b);
                let full = plain.batch(&s, &perm, e, b);
                let w = cut.width;
                assert!(w <= 20 && w > 0);
                for r in 0..cut.rows {
                    // the trimmed row is the full row without its leading padding columns
                    assert!(full.inputs[r * 20..r * 20 + 20 - w].iter().all(|&x| x == 0));
                    assert_eq!(&cut.inputs[r * w..(r + 1) * w], &full.inputs[r * 20 + 20 - w..(r + 1) * 20]);
                    assert_eq!(&cut.targets[r * w..(r + 1) * w], &full.targets[r * 20 + 20 - w..(r + 1) * 20]);
                    let n = 2;
                    assert_eq!(&cut.negatives[r * w * n..(r + 1) * w * n], &full.negatives[(r * 20 + 20 - w) * n..(r + 1) * 20 * n]);
                }
                // some row fills the first column: no column is all padding
                assert!((0..cut.rows).any(|r| cut.inputs[r * w] != 0));
            }
        }
    }

    #[test]
    fn hand_worked_windows() {
        // prefix [1..=8] (9, 10 held out): 7 transitions in windows of 3: 4..7, 1..4, 0..1
        let s = SequenceStore::from_sequences(&[(1..=10).collect::<Vec<i64>>()], Some(20)).unwrap();
        let mut c = cfg(3, 8);
        c.windows = true;
        let smp = TrainSampler::new(&s, c).unwrap();
        assert_eq!((smp.n_users(), smp.n_rows(), smp.n_batches()), (1, 3, 1));
        let b = smp.batch(&s, &[0, 1, 2], 0, 0);
        assert_eq!(b.inputs, vec![5, 6, 7, 2, 3, 4, 0, 0, 1]);
        assert_eq!(b.targets, vec![6, 7, 8, 3, 4, 5, 0, 0, 2]);
        assert_eq!(&b.negatives[12..16], &[0, 0, 0, 0]); // the padding of the first window
    }

    #[test]
    fn windows_make_every_transition_a_target_once() {
        // user u: distinct consecutive items, so a target names its position; lengths 3..=25
        let seqs: Vec<Vec<i64>> =
            (0..40i64).map(|u| (1 + 30 * u..1 + 30 * u + 3 + (u * 7) % 23).collect()).collect();
        let s = SequenceStore::from_sequences(&seqs, Some(1300)).unwrap();
        let last = TrainSampler::new(&s, cfg(4, 5)).unwrap();
        for (bucket, trim) in [(0, false), (2, true)] {
            let mut c = cfg(4, 5);
            c.windows = true;
            c.bucket_batches = bucket;
            c.trim = trim;
            let smp = TrainSampler::new(&s, c).unwrap();
            let want: usize = seqs.iter().map(|q| (q.len() - 3).div_ceil(4)).sum();
            assert_eq!(smp.n_rows(), want);
            for e in 0..3 {
                let perm = smp.permutation(&s, e);
                let mut sorted = perm.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..want as u32).collect::<Vec<u32>>());
                let mut targets: Vec<(u32, i64)> = Vec::new();
                for b in 0..smp.n_batches() {
                    let batch = smp.batch(&s, &perm, e, b);
                    let w = batch.width;
                    for r in 0..batch.rows {
                        let user = smp.user_of(perm[b * 5 + r]);
                        for j in 0..w {
                            let (x, y) = (batch.inputs[r * w + j], batch.targets[r * w + j]);
                            if y != 0 {
                                assert_eq!(x + 1, y, "the input is the item before the target");
                                targets.push((user, y));
                            }
                        }
                    }
                }
                // the oracle: every training transition of every user, once
                let mut expected: Vec<(u32, i64)> = Vec::new();
                for (u, q) in seqs.iter().enumerate() {
                    expected.extend(q[1..q.len() - 2].iter().map(|&y| (u as u32, y)));
                }
                targets.sort_unstable();
                expected.sort_unstable();
                assert_eq!(targets, expected, "epoch {e}");
            }
        }
        // window 0 of a user is its row without windows, negatives included
        let mut c = cfg(4, 5);
        c.windows = true;
        let smp = TrainSampler::new(&s, c).unwrap();
        let firsts: Vec<u32> = (0..smp.n_rows() as u32).filter(|&r| smp.rows[r as usize].1 == 0).collect();
        let users: Vec<u32> = (0..last.n_rows() as u32).collect();
        assert_eq!(firsts.len(), users.len());
        for b in 0..last.n_batches() {
            assert_eq!(smp.batch(&s, &firsts, 2, b), last.batch(&s, &users, 2, b));
        }
    }
}
