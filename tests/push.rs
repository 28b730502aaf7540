//! End-to-end tests: push.

mod common;
