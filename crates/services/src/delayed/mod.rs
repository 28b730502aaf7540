//! Delayed events (MSC4140): events a local user schedules to be sent later. Element Call
//! schedules its caller's "leave" (an empty `org.matrix.msc3401.call.member` state) and keeps
//! pushing it back while the app runs, so that a caller whose app dies leaves the call.
//!
//! Each scheduled event is one record, indexed by owner and by fire time; every change is one
//! atomic batch. A background task sends due events through the ordinary send path, as their
//! owner, and removes the record in the event's own batch: an event fires once, however the
//! server stops, and events that fell due while it was down fire when it starts.
//! spec/delayed-events.md describes the API.

use limbic_core::now_ms;
use std::{sync::Arc, time::Duration};

use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

use crate::{
    config::DelayedEventsConfig,
    error::{Error, Result},
    events::PduBuilder,
    host::LocalServer,
    store::{Batch, Key, KeyReader, Store, tables},
    users::Caller,
};

/// The query parameter of the send and state endpoints that schedules the event instead.
pub const DELAY_PARAM: &str = "org.matrix.msc4140.delay";

/// What a client may do with one of its scheduled events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Never send it.
    Cancel,
    /// Push the fire time back to now plus the original delay (the caller's heartbeat).
    Restart,
    /// Send it now.
    Send,
}

/// One scheduled event, keyed by its delay id.
#[derive(Serialize, Deserialize)]
struct Record {
    user_id: OwnedUserId,
    device_id: String,
    room_id: OwnedRoomId,
    kind: String,
    state_key: Option<String>,
    content: JsonValue,
    delay_ms: u64,
    /// Milliseconds since the epoch.
    fire_at: u64,
    /// The stream position when it was scheduled: once another user sets the same state after
    /// it, a delayed state event is cancelled, as Synapse does.
    scheduled_pos: u64,
    /// The transaction id of a delayed message, so that a retried request schedules it once.
    txn_id: Option<String>,
}

/// An event a client asks to schedule.
pub struct NewDelayedEvent<'a> {
    pub room_id: &'a RoomId,
    /// The event, already checked as the send and state endpoints check it.
    pub event: PduBuilder,
    pub delay_ms: u64,
    pub txn_id: Option<&'a str>,
}

/// What delayed events reach of the server beyond [`LocalServer`]; the server implements it.
pub trait DelayedHost: LocalServer {
    fn delayed(&self) -> &DelayedEvents;
    /// The checks of the send and state endpoints, which a delayed event passes when it fires.
    fn local_events(&self) -> crate::local_events::LocalEvents<'_>;
    /// [`LocalServer::send_local_event`], with `records` (the delayed event's removal) in the
    /// event's own write.
    fn send_local_event_with<'a>(&'a self, sender: &'a UserId, room_id: &'a RoomId, builder: crate::events::PduBuilder, records: crate::store::Batch) -> crate::host::Sent<'a>;
}

/// The server behind an `Arc`, as the API layer holds it.
impl<T: DelayedHost + ?Sized> DelayedHost for Arc<T> {
    fn delayed(&self) -> &DelayedEvents {
        (**self).delayed()
    }
    fn local_events(&self) -> crate::local_events::LocalEvents<'_> {
        (**self).local_events()
    }
    fn send_local_event_with<'a>(&'a self, sender: &'a UserId, room_id: &'a RoomId, builder: crate::events::PduBuilder, records: crate::store::Batch) -> crate::host::Sent<'a> {
        (**self).send_local_event_with(sender, room_id, builder, records)
    }
}

pub struct DelayedEvents {
    store: Arc<Store>,
    config: DelayedEventsConfig,
    /// Serialises every change to the records, firing included.
    lock: tokio::sync::Mutex<()>,
    /// Wakes the firing task when an event may now be due earlier than it planned for.
    wake: tokio::sync::Notify,
}


fn due_key(fire_at: u64, delay_id: &str) -> Vec<u8> {
    Key::new().u64(fire_at).str(delay_id).into_vec()
}

fn owner_key(user_id: &UserId, delay_id: &str) -> Vec<u8> {
    Key::new().str(user_id.as_str()).str(delay_id).into_vec()
}

impl DelayedEvents {
    pub fn new(store: Arc<Store>, config: DelayedEventsConfig) -> Self {
        Self { store, config, lock: tokio::sync::Mutex::new(()), wake: tokio::sync::Notify::new() }
    }

    /// Schedules an event of `owner` and answers its delay id. Only a member who may send the
    /// event now may schedule it; the room's full rules apply again when it fires.
    pub async fn schedule(&self, server: &dyn DelayedHost, owner: &Caller, new: NewDelayedEvent<'_>) -> Result<String> {
        if new.delay_ms > self.config.max_delay_ms {
            let max = self.config.max_delay_ms;
            // The shape Synapse answered and matrix-js-sdk reads to retry with the maximum.
            return Err(Error::Detailed {
                status: http::StatusCode::BAD_REQUEST,
                body: json!({
                    "errcode": "M_UNKNOWN",
                    "error": format!("the requested delay ({}ms) exceeds the allowed maximum ({max}ms)", new.delay_ms),
                    "org.matrix.msc4140.errcode": "M_MAX_DELAY_EXCEEDED",
                    "org.matrix.msc4140.max_delay": max,
                }),
            });
        }
        let kind = new.event.kind.to_string();
        check_may_send(server, new.room_id, &owner.user_id, &kind, new.event.state_key.is_some())?;
        let _guard = (self.lock.lock().await, self.store.hold("delayed events").await?);
        let mine = self.owned_by(&owner.user_id)?;
        if let Some(txn_id) = new.txn_id
            && let Some((delay_id, _)) = mine.iter().find(|(_, r)| r.device_id == owner.device_id.as_str() && r.txn_id.as_deref() == Some(txn_id))
        {
            return Ok(delay_id.clone());
        }
        if mine.len() >= self.config.max_per_user {
            let next = mine.iter().map(|(_, r)| r.fire_at).min().unwrap_or_default();
            return Err(Error::LimitExceeded { retry_after_ms: next.saturating_sub(now_ms()) });
        }
        // The id is the only handle of the unauthenticated update endpoint: 190 random bits.
        let delay_id = crate::users::random_string(32);
        let record = Record {
            user_id: owner.user_id.clone(),
            device_id: owner.device_id.to_string(),
            room_id: new.room_id.to_owned(),
            kind,
            state_key: new.event.state_key,
            content: new.event.content,
            delay_ms: new.delay_ms,
            fire_at: now_ms().saturating_add(new.delay_ms),
            scheduled_pos: self.store.streams().current(),
            txn_id: new.txn_id.map(str::to_owned),
        };
        let mut batch = self.store.batch();
        self.stage_put(&mut batch, &delay_id, &record)?;
        batch.put(tables::DELAYED_EVENTS_BY_OWNER, &owner_key(&record.user_id, &delay_id), b"");
        self.write(batch)?;
        self.wake.notify_one();
        Ok(delay_id)
    }

    /// Cancels, restarts or sends a scheduled event. With an `owner` (the authenticated
    /// endpoint) only their own events are found; without, the delay id is the capability.
    pub async fn update(&self, server: &dyn DelayedHost, delay_id: &str, action: Action, owner: Option<&UserId>) -> Result<()> {
        let _guard = (self.lock.lock().await, self.store.hold("delayed events").await?);
        let record = self
            .live_record(server, delay_id)?
            .filter(|record| owner.is_none_or(|owner| record.user_id == owner))
            .ok_or_else(|| Error::not_found("no such delayed event"))?;
        match action {
            Action::Cancel => {
                let mut batch = self.store.batch();
                self.stage_removal(&mut batch, delay_id, &record);
                self.write(batch)
            }
            Action::Restart => {
                let mut batch = self.store.batch();
                batch.delete(tables::DELAYED_EVENTS_DUE, &due_key(record.fire_at, delay_id));
                let record = Record { fire_at: now_ms().saturating_add(record.delay_ms), ..record };
                self.stage_put(&mut batch, delay_id, &record)?;
                self.write(batch)?;
                self.wake.notify_one();
                Ok(())
            }
            // An event that cannot be sent now stays scheduled, as MSC4140 asks.
            Action::Send => self.fire(server, delay_id, &record).await.map(drop),
        }
    }

    /// The owner's scheduled events, soonest first, in the shape Synapse lists them.
    pub fn list(&self, server: &dyn DelayedHost, owner: &UserId) -> Result<Vec<JsonValue>> {
        let mut mine = Vec::new();
        for (delay_id, record) in self.owned_by(owner)? {
            if !superseded(server, &record)? {
                mine.push((delay_id, record));
            }
        }
        mine.sort_by_key(|(_, record)| record.fire_at);
        Ok(mine
            .into_iter()
            .map(|(delay_id, record)| {
                let mut event = json!({
                    "delay_id": delay_id,
                    "room_id": record.room_id,
                    "type": record.kind,
                    "content": record.content,
                    "delay": record.delay_ms,
                    "running_since": record.fire_at.saturating_sub(record.delay_ms),
                });
                if let Some(state_key) = record.state_key {
                    event["state_key"] = json!(state_key);
                }
                event
            })
            .collect())
    }

    fn owned_by(&self, owner: &UserId) -> Result<Vec<(String, Record)>> {
        let prefix = Key::new().str(owner.as_str()).into_vec();
        let mut found = Vec::new();
        for item in self.store.scan_prefix(tables::DELAYED_EVENTS_BY_OWNER, prefix, false) {
            let (key, _) = item?;
            let Some(delay_id) = KeyReader::new(&key).skip_str().str() else { continue };
            if let Some(record) = self.record(delay_id)? {
                found.push((delay_id.to_owned(), record));
            }
        }
        Ok(found)
    }

    fn record(&self, delay_id: &str) -> Result<Option<Record>> {
        Ok(self.store.get_json(tables::DELAYED_EVENTS, delay_id.as_bytes())?)
    }

    /// The record, unless it is gone or another user's state has superseded it (then it is
    /// removed). Called under the lock.
    fn live_record(&self, server: &dyn DelayedHost, delay_id: &str) -> Result<Option<Record>> {
        let Some(record) = self.record(delay_id)? else { return Ok(None) };
        if !superseded(server, &record)? {
            return Ok(Some(record));
        }
        tracing::debug!(delay_id, room_id = %record.room_id, "delayed state event superseded by another user's");
        let mut batch = self.store.batch();
        self.stage_removal(&mut batch, delay_id, &record);
        self.write(batch)?;
        Ok(None)
    }

    fn stage_put(&self, batch: &mut Batch, delay_id: &str, record: &Record) -> Result<()> {
        batch.put_json(tables::DELAYED_EVENTS, delay_id.as_bytes(), record)?;
        batch.put(tables::DELAYED_EVENTS_DUE, &due_key(record.fire_at, delay_id), b"");
        Ok(())
    }

    fn stage_removal(&self, batch: &mut Batch, delay_id: &str, record: &Record) {
        batch.delete(tables::DELAYED_EVENTS, delay_id.as_bytes());
        batch.delete(tables::DELAYED_EVENTS_DUE, &due_key(record.fire_at, delay_id));
        batch.delete(tables::DELAYED_EVENTS_BY_OWNER, &owner_key(&record.user_id, delay_id));
    }

    fn write(&self, batch: Batch) -> Result<()> {
        tokio::task::block_in_place(|| self.store.write(batch))?;
        Ok(())
    }

    /// Sends the event as its owner through the ordinary send path; the record goes in the
    /// same batch as the event. Called under the lock.
    async fn fire(&self, server: &dyn DelayedHost, delay_id: &str, record: &Record) -> Result<OwnedEventId> {
        let event = server.local_events().builder(&record.room_id, &record.kind, record.state_key.as_deref(), record.content.clone())?;
        let mut removal = self.store.batch();
        self.stage_removal(&mut removal, delay_id, record);
        server.send_local_event_with(&record.user_id, &record.room_id, event, removal).await.map(|pdu| pdu.event_id)
    }

    /// Fires the first due event, if any. Answers how long until the next one is due: zero
    /// when one fired (there may be more), `None` when nothing is scheduled.
    async fn fire_next(&self, server: &dyn DelayedHost) -> Result<Option<u64>> {
        let _guard = (self.lock.lock().await, self.store.hold("delayed events").await?);
        let Some(first) = self.store.scan_prefix(tables::DELAYED_EVENTS_DUE, Vec::new(), false).next() else {
            return Ok(None);
        };
        let (key, _) = first?;
        let mut reader = KeyReader::new(&key);
        let (Some(fire_at), Some(delay_id)) = (reader.u64(), reader.str()) else {
            return Err(Error::internal("malformed key in delayed_events_due"));
        };
        let now = now_ms();
        if fire_at > now {
            return Ok(Some(fire_at - now));
        }
        let Some(record) = self.live_record(server, delay_id)? else {
            // A stale index entry: the record went with an earlier batch.
            let mut batch = self.store.batch();
            batch.delete(tables::DELAYED_EVENTS_DUE, &key);
            self.write(batch)?;
            return Ok(Some(0));
        };
        match self.fire(server, delay_id, &record).await {
            Ok(event_id) => tracing::debug!(delay_id, %event_id, room_id = %record.room_id, "sent delayed event"),
            Err(error) => {
                // Not retried (the MSC asks the same): e.g. the owner left or lost the power.
                tracing::info!(delay_id, room_id = %record.room_id, user_id = %record.user_id, %error, "dropped a delayed event that could not be sent");
                let mut batch = self.store.batch();
                self.stage_removal(&mut batch, delay_id, &record);
                self.write(batch)?;
            }
        }
        Ok(Some(0))
    }
}

/// How often the node that sends delayed events looks for new ones on a shared store.
const SHARED_POLL_MS: u64 = 1000;

/// Sends due events until shutdown, oldest first, starting with those that fell due while the
/// server was down.
pub async fn run(server: Arc<dyn DelayedHost>) {
    let mut stopping = server.shutting_down();
    loop {
        if *stopping.borrow() {
            return;
        }
        let wait = match server.delayed().fire_next(&*server).await {
            Ok(Some(0)) => continue,
            Ok(wait) => wait,
            Err(error) => {
                tracing::warn!(%error, "delayed events: retrying in a second");
                Some(1000)
            }
        };
        // Events scheduled through another node sharing the store wake nothing here: look at
        // least every second.
        let wait = if server.store().is_shared() { Some(wait.map_or(SHARED_POLL_MS, |ms| ms.min(SHARED_POLL_MS))) } else { wait };
        let sleep = async {
            match wait {
                Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = server.delayed().wake.notified() => {}
            _ = stopping.changed() => {}
        }
    }
}

/// A stranger is refused at once: the owner must be joined and have the power to send the event
/// now.
fn check_may_send(server: &dyn DelayedHost, room_id: &RoomId, user_id: &UserId, kind: &str, is_state: bool) -> Result<()> {
    if !server.rooms().is_joined(room_id, user_id)? {
        return Err(Error::forbidden("you are not joined to this room"));
    }
    // Membership changes have rules of their own, applied when the event fires.
    if kind == "m.room.member" {
        return Ok(());
    }
    let needed = server.rooms().state_content(room_id, "m.room.power_levels", "")?.map_or(0, |levels| {
        let default = if is_state { "state_default" } else { "events_default" };
        levels
            .get("events")
            .and_then(|events| events.get(kind))
            .or_else(|| levels.get(default))
            .and_then(JsonValue::as_i64)
            .unwrap_or(if is_state { 50 } else { 0 })
    });
    if server.rooms().user_power_level(room_id, user_id)? < needed {
        return Err(Error::forbidden(format!("you may not send {kind} events in this room")));
    }
    Ok(())
}

/// Whether another user has set the state a delayed state event would set since it was
/// scheduled: Synapse cancels it then, so that a stale "leave" cannot overwrite their state.
fn superseded(server: &dyn DelayedHost, record: &Record) -> Result<bool> {
    let Some(state_key) = &record.state_key else { return Ok(false) };
    let Some(current) = server.rooms().state_event(&record.room_id, &record.kind, state_key)? else { return Ok(false) };
    if current.sender == record.user_id {
        return Ok(false);
    }
    Ok(server.rooms().meta(&current.event_id)?.is_some_and(|meta| meta.pos > record.scheduled_pos))
}
