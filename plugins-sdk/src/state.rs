//! Where a plugin keeps what its `init` builds from the config.

use std::sync::OnceLock;

use crate::Error;

/// A value set once by the plugin's `init` and read by its transform function:
///
/// ```
/// use weir_plugin_sdk::{Config, Error, Record, State};
///
/// static SUFFIX: State<String> = State::new();
///
/// fn init(config: &Config) -> Result<(), Error> {
///     SUFFIX.set(config.str("suffix")?.unwrap_or("!").to_string());
///     Ok(())
/// }
///
/// fn shout(mut r: Record) -> Result<Record, Error> {
///     let text = format!("{}{}", r.value_str()?.to_uppercase(), SUFFIX.get()?);
///     r.value = Some(text.into_bytes());
///     Ok(r)
/// }
///
/// weir_plugin_sdk::export_map!(shout, init = init);
/// ```
///
/// Each plugin instance is a fresh module, so `init` runs once per `State`; a later `set` in
/// the same module (only possible in native unit tests, which share one process) keeps the
/// first value.
pub struct State<T> {
    cell: OnceLock<T>,
}

impl<T> State<T> {
    pub const fn new() -> State<T> {
        State {
            cell: OnceLock::new(),
        }
    }

    /// Store the value (the first one stored stays).
    pub fn set(&self, value: T) {
        let _ = self.cell.set(value);
    }

    /// The stored value; an error (for the record at hand) when `init` has not stored one.
    pub fn get(&self) -> Result<&T, Error> {
        self.cell
            .get()
            .ok_or_else(|| Error::new("the plugin's init has not run (no state set)"))
    }
}

impl<T> Default for State<T> {
    fn default() -> State<T> {
        State::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_value_stays_and_get_before_set_is_an_error() {
        let s: State<u32> = State::new();
        assert!(s.get().unwrap_err().message().contains("init has not run"));
        s.set(1);
        s.set(2);
        assert_eq!(*s.get().unwrap(), 1);
    }
}
