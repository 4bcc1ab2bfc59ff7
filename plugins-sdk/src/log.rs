//! Logging from a plugin. Messages go to the host, which writes them to the daemon's log tagged
//! with the plugin's name (and the pipeline's, when the plugin runs in one). Outside WASM (in a
//! plugin's native unit tests) they go to stderr.
//!
//! The host keeps at most a few hundred lines per call and cuts long messages, so logging every
//! record of a large batch loses lines; log what is unusual.

use crate::abi::level;

/// Send one message at `level` (see [`crate::abi::level`]).
pub fn log(level: u32, message: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `message.len()` bytes at `message.as_ptr()` in this module's memory
    // during the call and keeps no reference to them.
    unsafe {
        crate::guest::host::log(level, message.as_ptr(), message.len() as u32)
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {}] {message}", level_name(level));
}

/// The name of a log level, as the host prints it.
pub fn level_name(l: u32) -> &'static str {
    match l {
        level::ERROR => "error",
        level::WARN => "warn",
        level::INFO => "info",
        level::DEBUG => "debug",
        level::TRACE => "trace",
        _ => "info",
    }
}

pub fn error(message: &str) {
    log(level::ERROR, message)
}

pub fn warn(message: &str) {
    log(level::WARN, message)
}

pub fn info(message: &str) {
    log(level::INFO, message)
}

pub fn debug(message: &str) {
    log(level::DEBUG, message)
}

pub fn trace(message: &str) {
    log(level::TRACE, message)
}

/// `error!("format {}", args)`: log at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::log($crate::abi::level::ERROR, &format!($($arg)*)) };
}

/// `warn!("format {}", args)`: log at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::log($crate::abi::level::WARN, &format!($($arg)*)) };
}

/// `info!("format {}", args)`: log at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::log($crate::abi::level::INFO, &format!($($arg)*)) };
}

/// `debug!("format {}", args)`: log at debug level.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::log($crate::abi::level::DEBUG, &format!($($arg)*)) };
}

/// `trace!("format {}", args)`: log at trace level.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::log($crate::abi::level::TRACE, &format!($($arg)*)) };
}
