//! What a domain service reaches of the server it runs in, without naming the `Server` that
//! composes every service (which would tie each module to all the others): the rooms, the users,
//! the store, the device keys, the server's name and the local send path. Modules that need more
//! extend it with a trait of their own (`clinic::ClinicHost`, `sync::SyncHost`, ...); `Server`
//! implements them.

use std::{future::Future, pin::Pin, sync::Arc};

use ruma::{RoomId, ServerName, UserId};

use crate::{
    e2ee::E2ee,
    error::Result,
    events::{Pdu, PduBuilder},
    rooms::Rooms,
    store::Store,
    users::Users,
};

/// Waits until this node leads `job` (a sender, a sweeper: work for one node at a time) among
/// the nodes sharing the store, at once on the embedded store; while the database cannot be
/// reached, it tries again every second.
pub async fn lead(store: &Store, job: &str) {
    loop {
        match store.lead(job).await {
            Ok(()) => {
                if store.is_shared() {
                    tracing::info!(job, "this node runs the job");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, job, "could not take the lead of a job; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// The future of [`LocalServer::send_local_event`].
pub type Sent<'a> = Pin<Box<dyn Future<Output = Result<Pdu>> + Send + 'a>>;

pub trait LocalServer: Send + Sync {
    fn rooms(&self) -> &Rooms;
    fn users(&self) -> &Users;
    fn store(&self) -> &Store;
    /// Devices' keys and to-device messages.
    fn e2ee(&self) -> &E2ee;
    fn server_name(&self) -> &ServerName;
    /// Turns true when the server begins to shut down.
    fn shutting_down(&self) -> tokio::sync::watch::Receiver<bool>;
    /// Appends an event of a local user and commits it, as a client's send does: the room's
    /// rules, the clinic's and the plugins' `check-event`, the sub-rooms a role change ends, the
    /// after-commit hooks.
    fn send_local_event<'a>(&'a self, sender: &'a UserId, room_id: &'a RoomId, builder: PduBuilder) -> Sent<'a>;
}

/// The server behind an `Arc`, as the API layer holds it.
impl<T: LocalServer + ?Sized> LocalServer for Arc<T> {
    fn rooms(&self) -> &Rooms {
        (**self).rooms()
    }
    fn users(&self) -> &Users {
        (**self).users()
    }
    fn store(&self) -> &Store {
        (**self).store()
    }
    fn e2ee(&self) -> &E2ee {
        (**self).e2ee()
    }
    fn server_name(&self) -> &ServerName {
        (**self).server_name()
    }
    fn shutting_down(&self) -> tokio::sync::watch::Receiver<bool> {
        (**self).shutting_down()
    }
    fn send_local_event<'a>(&'a self, sender: &'a UserId, room_id: &'a RoomId, builder: PduBuilder) -> Sent<'a> {
        (**self).send_local_event(sender, room_id, builder)
    }
}
