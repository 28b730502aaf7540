//! End-to-end tests: e2ee.

mod common;
