//! The room pipeline: each event built, authorized, persisted in one atomic batch and announced,
//! fanning out to the policies, indexers and after-commit hooks the server registers at start-up
//! (`rooms::Fanout`); room state, membership, visibility, relations, summaries, retention. With
//! it, the audit chain its writes carry and the key that seals secrets at rest.
//!
//! It names nothing above it: no HTTP, no clinic services, no federation, no plugins. The server
//! re-exports these modules under their old paths (`crate::rooms`, `crate::audit`,
//! `crate::secrets`).

pub mod audit;
pub mod rooms;
pub mod secrets;

pub use limbic_core::{Error, Result, config, error, events};
pub use limbic_store as store;

/// Rooms of nodes named `names` sharing the PostgreSQL database at `url`, one server (one
/// signing key, one audit key in `dir`).
#[cfg(test)]
pub(crate) fn test_nodes(url: &str, dir: &std::path::Path, names: &[&str]) -> Vec<std::sync::Arc<rooms::Rooms>> {
    use std::sync::Arc;
    let key = Arc::new(events::ServerSigningKey::generate(ruma::server_name!("test.local").to_owned()));
    names
        .iter()
        .map(|name| {
            let store = Arc::new(store::Store::open_node(url, 4, name, true).expect("a node's store"));
            let audit = Arc::new(audit::Audit::load(&store, &dir.join("audit.key")).expect("a node's audit chain"));
            Arc::new(rooms::Rooms::new(store, key.clone(), audit, false))
        })
        .collect()
}

/// Rooms on a store in a temporary directory, for the pipeline's own tests.
#[cfg(test)]
pub(crate) fn test_rooms(dir: &std::path::Path) -> rooms::Rooms {
    use std::sync::Arc;
    let store = Arc::new(store::Store::open(&dir.join("db")).expect("test store"));
    let key = Arc::new(events::ServerSigningKey::generate(ruma::server_name!("test.local").to_owned()));
    let audit = Arc::new(audit::Audit::load(&store, &dir.join("audit.key")).expect("test audit chain"));
    rooms::Rooms::new(store, key, audit, false)
}
