//! The server's clock. Needs no capability.

use crate::bindings::limbic::plugin::host;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    host::now_ms()
}

/// A moment in UTC, broken down to the second; `to_string()` gives `YYYY-MM-DD HH:MM:SS UTC`.
pub use limbic_clinic_model::UtcTime;
