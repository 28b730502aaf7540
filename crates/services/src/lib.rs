//! Limbic's domain services, between the room pipeline (`limbic-rooms`) below and the API layer
//! (`limbic-server`) above: the clinic (sessions, notes, bookings, appointments), calls, media,
//! push, sync, search, users and devices, end-to-end keys, delayed events, federation, the plugin
//! host, administration. Each reaches the rest of the server through a narrow host trait
//! (`host::LocalServer` and the traits that extend it); the `Server` that composes them all is
//! in the API crate, beside the binary. It names no HTTP handler.

pub mod accounts;
pub mod admin;
pub mod calls;
pub mod clinic;
pub mod cluster;
pub mod delayed;
pub mod e2ee;
pub mod federation;
pub mod host;
pub mod local_events;
pub mod media;
pub mod membership;
pub mod metrics;
pub mod net_filter;
pub mod plugins;
pub mod privacy;
pub mod push;
pub mod ratelimit;
pub mod room_creation;
pub mod search;
pub mod sync;
pub mod users;

pub use limbic_core::{Error, Result, config, error, events, network};
pub use limbic_rooms::{audit, rooms, secrets};
pub use limbic_store as store;
