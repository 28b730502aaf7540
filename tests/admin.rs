//! End-to-end tests: admin.

mod common;
