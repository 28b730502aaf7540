//! What every part of Limbic shares: the configuration, the error type and its Matrix error
//! responses, PDUs with their hashes, signatures and redaction, and the networks the operator
//! names. Above the store, below everything else.

pub mod config;
pub mod error;
pub mod events;
pub mod network;

pub use error::{Error, Result};
