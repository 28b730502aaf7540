//! The server's clock. Needs no capability.

use crate::bindings::limbic::plugin::host;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    host::now_ms()
}
