//! The host functions a plugin imports (`limbic:plugin/host`). Each checks the plugin's
//! capabilities and the call's mode before it touches anything; a refusal is an error value
//! inside the plugin, never a trap.

use std::{sync::Arc, time::Duration};

use ruma::{OwnedRoomId, OwnedUserId, RoomVersionId};
use serde_json::{Value as JsonValue, json};

use super::{
    Capability, HostServices, PluginContext,
    bindings::limbic::plugin::{
        host,
        types::{self, Event, HostError, HttpResponse, LogLevel, MatrixError, Member, OutboundRequest, RoomSpec},
    },
    runtime::{CallMode, HostState},
};
use crate::{
    error::Error,
    events::{Pdu, PduBuilder},
    store::{Key, KeyReader, tables},
};

/// Largest key and value of the plugin store, and the most entries one scan returns.
const MAX_KV_KEY: usize = 1024;
const MAX_KV_VALUE: usize = 1 << 20;
const MAX_KV_SCAN: u32 = 1000;
/// Outbound HTTP: a deadline and a cap on the response body.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time kept back from a call's budget for the plugin to handle the answer.
const HTTP_MARGIN: Duration = Duration::from_millis(100);
const MAX_HTTP_RESPONSE: usize = 4 << 20;

/// A stored event as the plugin sees it.
pub fn event(pdu: &Pdu) -> Event {
    Event {
        event_id: pdu.event_id.to_string(),
        room_id: pdu.room_id.to_string(),
        sender: pdu.sender.to_string(),
        event_type: pdu.kind.to_string(),
        state_key: pdu.state_key.clone(),
        content: pdu.content.get().to_owned(),
        origin_server_ts: pdu.origin_server_ts.0.into(),
    }
}

fn refused(error: Error) -> HostError {
    let (status, errcode, message) = error.describe();
    HostError::Refused(MatrixError { status: status.as_u16(), errcode, message })
}

fn invalid(message: impl Into<String>) -> HostError {
    HostError::Invalid(message.into())
}

fn room_id(room: &str) -> Result<OwnedRoomId, HostError> {
    OwnedRoomId::try_from(room).map_err(|_| invalid(format!("{room:?} is not a room id")))
}

/// A room `rooms.read` reaches: any but a session's notes room, which reads exactly as a room
/// that does not exist (`None`): notes are for the session's therapists alone.
fn readable_room(server: &dyn HostServices, room: &str) -> Result<Option<OwnedRoomId>, HostError> {
    let room_id = room_id(room)?;
    if crate::clinic::subrooms::is_notes_room(server.rooms(), &room_id).map_err(refused)? {
        return Ok(None);
    }
    Ok(Some(room_id))
}

fn json_object(content: &str) -> Result<JsonValue, HostError> {
    match serde_json::from_str(content) {
        Ok(value @ JsonValue::Object(_)) => Ok(value),
        _ => Err(invalid("content must be a JSON object")),
    }
}

impl HostState {
    fn require(&self, capability: Capability) -> Result<&Arc<PluginContext>, HostError> {
        if self.context.capabilities.contains(&capability) {
            Ok(&self.context)
        } else {
            Err(HostError::NotGranted(capability.name().to_owned()))
        }
    }

    fn writable(&self, what: &str) -> Result<(), HostError> {
        match self.mode {
            CallMode::Full => Ok(()),
            CallMode::ReadOnly => Err(HostError::NotAllowed(format!("{what} is not allowed during check-event"))),
        }
    }

    fn server(&self) -> Result<Arc<dyn HostServices>, HostError> {
        self.context.server().ok_or_else(|| HostError::Failed("the server is shutting down".into()))
    }

    /// The user a write acts as: the plugin's own, or a local user (capability `users.act-as`).
    fn acting_user(&self, sender: Option<String>) -> Result<OwnedUserId, HostError> {
        let own = &self.context.user_id;
        let Some(sender) = sender.filter(|s| s != own.as_str()) else { return Ok(own.clone()) };
        self.require(Capability::UsersActAs)?;
        let user = OwnedUserId::try_from(sender.as_str()).map_err(|_| invalid(format!("{sender:?} is not a user id")))?;
        let server = self.server()?;
        if user.server_name() != server.server_name() || !server.users().exists(&user).map_err(refused)? {
            return Err(invalid(format!("{user} is not a user of this server")));
        }
        Ok(user)
    }

    fn kv_key(&self, key: &str) -> Result<Vec<u8>, HostError> {
        kv_key(&self.context.name, key)
    }
}

/// The store key of a plugin's key: in the plugin's own namespace, of bounded length.
pub fn kv_key(plugin: &str, key: &str) -> Result<Vec<u8>, HostError> {
    if key.len() > MAX_KV_KEY {
        return Err(invalid(format!("keys are at most {MAX_KV_KEY} bytes")));
    }
    Ok(Key::new().str(plugin).str(key).into_vec())
}

/// A plugin store value is of bounded size.
pub fn check_kv_value(value: &[u8]) -> Result<(), HostError> {
    if value.len() > MAX_KV_VALUE {
        return Err(invalid(format!("values are at most {MAX_KV_VALUE} bytes")));
    }
    Ok(())
}

/// The room and the event of a plugin's `send-event`.
pub fn event_request(room: &str, event_type: &str, state_key: Option<String>, content: &str) -> Result<(OwnedRoomId, PduBuilder), HostError> {
    let (room_id, content) = (room_id(room)?, json_object(content)?);
    let builder = match state_key {
        Some(key) => PduBuilder::state(event_type, key, content),
        None => PduBuilder::message(event_type, content),
    };
    Ok((room_id, builder))
}

/// The initial events of a plugin's `create-room`, created by `creator`.
pub fn room_events(creator: &ruma::UserId, spec: RoomSpec) -> Result<Vec<PduBuilder>, HostError> {
    let mut users = serde_json::Map::new();
    for (user, level) in &spec.power_levels {
        OwnedUserId::try_from(user.as_str()).map_err(|_| invalid(format!("{user:?} is not a user id")))?;
        users.insert(user.clone(), json!(level));
    }
    users.insert(creator.to_string(), json!(100));
    let mut events = vec![
        PduBuilder::state("m.room.create", "", json!({ "room_version": "11" })),
        PduBuilder::state("m.room.member", creator.as_str(), json!({ "membership": "join" })),
        PduBuilder::state("m.room.power_levels", "", json!({ "users": users, "users_default": 0, "events_default": 0, "state_default": 50, "invite": 50, "kick": 50, "ban": 50, "redact": 50 })),
        PduBuilder::state("m.room.join_rules", "", json!({ "join_rule": "invite" })),
        PduBuilder::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })),
        PduBuilder::state("m.room.guest_access", "", json!({ "guest_access": "forbidden" })),
    ];
    if let Some(name) = spec.name {
        events.push(PduBuilder::state("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = spec.topic {
        events.push(PduBuilder::state("m.room.topic", "", json!({ "topic": topic })));
    }
    for entry in spec.initial_state {
        events.push(PduBuilder::state(entry.event_type.as_str(), entry.state_key, json_object(&entry.content)?));
    }
    for user in &spec.invite {
        let user = OwnedUserId::try_from(user.as_str()).map_err(|_| invalid(format!("{user:?} is not a user id")))?;
        events.push(PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })));
    }
    Ok(events)
}

/// The method and URL of a plugin's `http-fetch`, to a host the operator granted it.
pub fn outbound_target(request: &OutboundRequest, granted_hosts: &[String]) -> Result<(reqwest::Method, reqwest::Url), HostError> {
    let url = reqwest::Url::parse(&request.url).map_err(|e| invalid(format!("bad url: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("only http and https urls"));
    }
    let host = url.host_str().unwrap_or_default();
    let with_port = format!("{host}:{}", url.port_or_known_default().unwrap_or_default());
    if !granted_hosts.iter().any(|granted| *granted == host || *granted == with_port) {
        return Err(HostError::NotGranted(format!("http to {with_port}")));
    }
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|_| invalid("bad method"))?;
    Ok((method, url))
}

/// Runs a server future from a plugin call (always on a blocking thread).
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Handle::current().block_on(future)
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) {
        let plugin = self.context.name.as_str();
        match level {
            LogLevel::Error => tracing::error!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        ruma::MilliSecondsSinceUnixEpoch::now().0.into()
    }

    fn server_name(&mut self) -> String {
        self.context.user_id.server_name().to_string()
    }

    fn plugin_user(&mut self) -> String {
        self.context.user_id.to_string()
    }

    fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let context = self.require(Capability::Kv)?.clone();
        let key = self.kv_key(&key)?;
        let Some(stored) = context.store.get(tables::PLUGIN_KV, &key).map_err(|e| refused(e.into()))? else { return Ok(None) };
        self.server()?.secrets().open(tables::PLUGIN_KV, &key, &stored).map(Some).map_err(refused)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let context = self.require(Capability::Kv)?.clone();
        self.writable("kv-set")?;
        check_kv_value(&value)?;
        // Values are sealed with the server key: plugins keep credentials here (CalDAV passwords).
        let key = self.kv_key(&key)?;
        let sealed = self.server()?.secrets().seal(tables::PLUGIN_KV, &key, &value);
        let mut batch = context.store.batch();
        batch.put(tables::PLUGIN_KV, &key, &sealed);
        context.store.write(batch).map_err(|e| refused(e.into()))
    }

    fn kv_delete(&mut self, key: String) -> Result<(), HostError> {
        let context = self.require(Capability::Kv)?.clone();
        self.writable("kv-delete")?;
        let mut batch = context.store.batch();
        batch.delete(tables::PLUGIN_KV, &self.kv_key(&key)?);
        context.store.write(batch).map_err(|e| refused(e.into()))
    }

    fn kv_scan(&mut self, prefix: String, start_after: Option<String>, limit: u32) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let context = self.require(Capability::Kv)?.clone();
        let plugin_prefix = Key::new().str(&context.name).into_vec();
        let server = self.server()?;
        let mut entries = Vec::new();
        for item in context.store.scan_prefix(tables::PLUGIN_KV, plugin_prefix, false) {
            let (raw, value) = item.map_err(|e| refused(e.into()))?;
            let Some(key) = KeyReader::new(&raw).skip_str().str().map(str::to_owned) else { continue };
            if !key.starts_with(&prefix) || start_after.as_ref().is_some_and(|after| key.as_str() <= after.as_str()) {
                continue;
            }
            entries.push((key, server.secrets().open(tables::PLUGIN_KV, &raw, &value).map_err(refused)?));
            if entries.len() as u32 >= limit.clamp(1, MAX_KV_SCAN) {
                break;
            }
        }
        Ok(entries)
    }

    fn state_event(&mut self, room: String, event_type: String, state_key: String) -> Result<Option<Event>, HostError> {
        self.require(Capability::RoomsRead)?;
        let server = self.server()?;
        let Some(room_id) = readable_room(&*server, &room)? else { return Ok(None) };
        Ok(server.rooms().state_event(&room_id, &event_type, &state_key).map_err(refused)?.as_ref().map(event))
    }

    fn room_state(&mut self, room: String) -> Result<Vec<Event>, HostError> {
        self.require(Capability::RoomsRead)?;
        let server = self.server()?;
        let Some(room_id) = readable_room(&*server, &room)? else { return Ok(Vec::new()) };
        Ok(server.rooms().current_state(&room_id).map_err(refused)?.iter().map(event).collect())
    }

    fn room_members(&mut self, room: String) -> Result<Vec<Member>, HostError> {
        self.require(Capability::RoomsRead)?;
        let server = self.server()?;
        let Some(room_id) = readable_room(&*server, &room)? else { return Ok(Vec::new()) };
        let members = server.rooms().members(&room_id).map_err(refused)?;
        Ok(members.into_iter().map(|(user, membership)| Member { user_id: user.to_string(), membership: membership.as_str().to_owned() }).collect())
    }

    fn send_event(&mut self, room: String, sender: Option<String>, event_type: String, state_key: Option<String>, content: String) -> Result<String, HostError> {
        self.require(Capability::RoomsSend)?;
        self.writable("send-event")?;
        let (room_id, builder) = event_request(&room, &event_type, state_key, &content)?;
        let sender = self.acting_user(sender)?;
        let server = self.server()?;
        block_on(server.send_local_event(&sender, &room_id, builder)).map(|pdu| pdu.event_id.to_string()).map_err(refused)
    }

    fn create_room(&mut self, creator: Option<String>, spec: RoomSpec) -> Result<String, HostError> {
        self.require(Capability::RoomsCreate)?;
        self.writable("create-room")?;
        let creator = self.acting_user(creator)?;
        if !spec.invite.is_empty() {
            self.require(Capability::RoomsInvite)?;
        }
        let events = room_events(&creator, spec)?;
        let server = self.server()?;
        block_on(async {
            let writer = server.rooms().new_room(RoomVersionId::V11, &creator, events).await?;
            let room_id = writer.room_id().clone();
            writer.commit()?;
            Ok(room_id.to_string())
        })
        .map_err(refused)
    }

    fn invite(&mut self, room: String, sender: Option<String>, user: String) -> Result<(), HostError> {
        self.require(Capability::RoomsInvite)?;
        self.writable("invite")?;
        let (room_id, sender) = (room_id(&room)?, self.acting_user(sender)?);
        let user = OwnedUserId::try_from(user.as_str()).map_err(|_| invalid(format!("{user:?} is not a user id")))?;
        let server = self.server()?;
        block_on(async {
            let mut writer = server.rooms().writer(&room_id).await?;
            if !writer.exists() {
                return Err(Error::not_found("unknown room"));
            }
            writer.append(&sender, PduBuilder::state("m.room.member", user.as_str(), json!({ "membership": "invite" })), None)?;
            writer.commit().map(drop)
        })
        .map_err(refused)
    }

    fn http_fetch(&mut self, request: OutboundRequest) -> Result<HttpResponse, HostError> {
        let context = self.require(Capability::Http)?.clone();
        self.writable("http-fetch")?;
        let (method, url) = outbound_target(&request, &context.http_hosts)?;
        // Within what is left of the call's budget, so that a slow peer is an error the plugin
        // sees rather than an overrun that traps it.
        let left = self.deadline.saturating_duration_since(std::time::Instant::now()).saturating_sub(HTTP_MARGIN);
        if left.is_zero() {
            return Err(HostError::Failed("no time left in this call for an HTTP request".into()));
        }
        let timeout = left.min(HTTP_TIMEOUT);
        let client = context.http.clone();
        block_on(async move {
            let mut outbound = client.request(method, url).timeout(timeout).body(request.body);
            for (name, value) in &request.headers {
                outbound = outbound.header(name, value);
            }
            let mut response = outbound.send().await.map_err(|e| HostError::Failed(e.to_string()))?;
            let status = response.status().as_u16();
            let headers = response.headers().iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())).collect();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| HostError::Failed(e.to_string()))? {
                if body.len() + chunk.len() > MAX_HTTP_RESPONSE {
                    return Err(HostError::Failed(format!("response larger than {MAX_HTTP_RESPONSE} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(HttpResponse { status, headers, body })
        })
    }
}
