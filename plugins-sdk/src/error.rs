//! The error a plugin returns for one record; its message ends up on the dead-letter record.

use std::fmt;

/// Why a plugin could not handle a record (or could not start, from `init`).
///
/// Any `std::error::Error` converts into it, so `?` works on parse errors and the like. It does
/// not implement `std::error::Error` itself, which is what makes that blanket conversion possible.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?})", self.message)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Error {
        Error::new(e.to_string())
    }
}

/// Return early with an [`Error`] built from a format string: `bail!("no field {name}")`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::new(format!($($arg)*)))
    };
}
