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
