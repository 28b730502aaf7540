//! matrix-rust-sdk 0.18 (matrix-sdk and matrix-sdk-ui) against a real homeserver: see the crate's
//! Cargo.toml and src/lib.rs. One test binary, one module per area; every test starts its own
//! server.

// The SDK's futures nest deeply: a clean (non-incremental) build of the larger tests overflows
// the default query depth when computing their layout.
#![recursion_limit = "256"]

mod delayed_events;
mod e2ee;
mod knocking;
mod login;
mod media;
mod notifications;
mod recovery;
mod restart;
mod room_details;
mod room_list;
mod timeline;
mod typing_receipts;
