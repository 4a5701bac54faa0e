//! One error type for every kernel. `Invalid` is the caller's fault (bad argument or data) and
//! becomes `ValueError` in Python; `Invariant` is a broken internal promise (`RuntimeError`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A bad argument or bad data; the message names the argument and the value.
    Invalid(String),
    /// Something the kernels promise never to do happened anyway.
    Invariant(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid(m) | Error::Invariant(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// `invalid!("items[{i}]={v} >= n_items={n}")` builds an `Error::Invalid`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => { $crate::error::Error::Invalid(format!($($arg)*)) };
}

/// Returns early with `Error::Invalid` unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond { return Err($crate::invalid!($($arg)*)); }
    };
}

/// A vector of `rows × cols` zeros (the default value), or `Error::Invalid` naming `what` when
/// that size overflows or the memory cannot be had (instead of the allocator's abort).
pub fn zeros<T: Clone + Default>(rows: usize, cols: usize, what: &str) -> Result<Vec<T>> {
    let n = rows.checked_mul(cols).ok_or_else(|| invalid!("{what} of {rows} x {cols} is too large"))?;
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        invalid!("no memory for {what} of {rows} x {cols} ({} bytes)", n.saturating_mul(std::mem::size_of::<T>()))
    })?;
    v.resize(n, T::default());
    Ok(v)
}
