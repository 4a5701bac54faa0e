//! Evaluation candidates: the target followed by distinct items the user never touched.

use rayon::prelude::*;

use crate::csr::SequenceStore;
use crate::error::Result;
use crate::negative::draw_unseen;
use crate::rng::{Rng, TAG_EVAL_NEG};
use crate::ensure;

/// `(B * (1 + n))` row-major; row i = [targets[i], n distinct unseen items]. Row i draws from
/// the stream (seed, user), so a user's candidates do not depend on batching or threads.
pub fn sample_candidates(store: &SequenceStore, users: &[i64], targets: &[i64], n: usize, seed: u64) -> Result<Vec<i64>> {
    ensure!(
        users.len() == targets.len(),
        "users has {} entries but targets has {}",
        users.len(),
        targets.len()
    );
    let mut rows = Vec::with_capacity(users.len());
    for (i, (&u, &t)) in users.iter().zip(targets).enumerate() {
        let u = store.check_user("users", i, u)?;
        ensure!(
            t >= 1 && t <= store.n_items() as i64,
            "targets[{i}]={t} is not an item id (1..={})",
            store.n_items()
        );
        let mut unseen = store.n_items() as usize - store.seen(u).len();
        if !store.has_seen(u, t as u32) {
            unseen -= 1; // the target itself is never a negative
        }
        ensure!(
            unseen >= n,
            "user row {u} has only {unseen} untouched items; cannot draw n_negatives={n} distinct ones"
        );
        rows.push(u);
    }
    let w = n + 1;
    let mut out = vec![0i64; users.len() * w];
    out.par_chunks_mut(w).zip(rows.par_iter()).zip(targets.par_iter()).for_each(|((row, &u), &t)| {
        row[0] = t;
        let mut rng = Rng::stream(seed, TAG_EVAL_NEG, u as u64, 0);
        let mut taken: Vec<u32> = Vec::with_capacity(n);
        let mut filled = 1;
        while filled < w {
            let c = draw_unseen(store.seen(u), store.n_items(), &mut rng, None);
            if c as i64 == t {
                continue;
            }
            if let Err(pos) = taken.binary_search(&c) {
                taken.insert(pos, c);
                row[filled] = c as i64;
                filled += 1;
            }
        }
    });
    Ok(out)
}
