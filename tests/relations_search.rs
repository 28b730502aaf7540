//! End-to-end tests: relations_search.

mod common;
