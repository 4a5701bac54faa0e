//! Thread pools by size, so a caller can pin a call to `n` threads (`None` = the global pool).
//! Pools are built once per size and kept; results never depend on the size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{Error, Result};

fn pools() -> &'static Mutex<HashMap<usize, Arc<rayon::ThreadPool>>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The pool for `n` threads, built on first use.
pub fn pool(n: usize) -> Result<Arc<rayon::ThreadPool>> {
    if n == 0 {
        return Err(crate::invalid!("n_threads=0 must be at least 1 (or None for all cores)"));
    }
    let mut map = pools().lock().map_err(|_| Error::Invariant("thread-pool registry poisoned".into()))?;
    if let Some(p) = map.get(&n) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(move |i| format!("h2rec-{n}-{i}"))
        .build()
        .map_err(|e| Error::Invariant(format!("could not start {n} threads: {e}")))?;
    let p = Arc::new(p);
    map.insert(n, p.clone());
    Ok(p)
}

/// Runs `f` on `n_threads` threads (`None`: the global rayon pool).
pub fn run<R: Send>(n_threads: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    match n_threads {
        None => Ok(f()),
        Some(n) => Ok(pool(n)?.install(f)),
    }
}
