//! The throwaway PostgreSQL server for test suites in other languages (the interop suite's
//! cluster mode): each line read from standard input names a purpose, and the URL of a new
//! empty database for it is written out. The server stops when standard input closes.

use std::io::{BufRead, Write};

use limbic_test_postgres::TempPostgres;

fn main() {
    let postgres = TempPostgres::start();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let Ok(purpose) = line else { break };
        let purpose: String = purpose.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if writeln!(out, "{}", postgres.new_database(if purpose.is_empty() { "db" } else { &purpose })).and_then(|()| out.flush()).is_err() {
            break;
        }
    }
}
