//! h2rec's data hot path. Pure Rust kernels (no PyO3 type in them), one per file, and one thin
//! binding layer (`py`) behind the `python` feature.

pub mod error;
pub mod rng;
pub mod simd;
pub mod pool;
pub mod csr;
pub mod negative;
pub mod batch;
pub mod candidates;
pub mod kmeans;
pub mod cooccur;
pub mod dropout;
pub mod spmm;
pub mod score;

#[cfg(feature = "python")]
mod py;
