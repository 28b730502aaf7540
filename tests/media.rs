//! End-to-end tests: media.

mod common;
