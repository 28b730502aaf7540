//! The server's log, tagged with the plugin's name. Needs no capability.
//!
//! ```no_run
//! # let room_id = "!abc:clinic.example";
//! limbic_plugin_sdk::log::info(&format!("created {room_id}"));
//! ```

use crate::{LogLevel, bindings::limbic::plugin::host};

/// Writes `message` at `level`.
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message)
}

/// Writes an error.
pub fn error(message: &str) {
    log(LogLevel::Error, message)
}

/// Writes a warning.
pub fn warn(message: &str) {
    log(LogLevel::Warn, message)
}

/// Writes an informational message.
pub fn info(message: &str) {
    log(LogLevel::Info, message)
}

/// Writes a debug message.
pub fn debug(message: &str) {
    log(LogLevel::Debug, message)
}
