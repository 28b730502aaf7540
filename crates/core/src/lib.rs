//! What every part of Limbic shares: the configuration, the error type and its Matrix error
//! responses, PDUs with their hashes, signatures and redaction, and the networks the operator
//! names. Above the store, below everything else.

pub mod config;
pub mod error;
pub mod events;
pub mod network;

pub use error::{Error, Result};

/// The time now, in milliseconds since the Unix epoch (Matrix's timestamps).
pub fn now_ms() -> u64 {
    ruma::MilliSecondsSinceUnixEpoch::now().0.into()
}
