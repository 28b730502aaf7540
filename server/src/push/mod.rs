//! Push: each user's push rules (the spec's defaults plus their own), rule evaluation for every
//! new event (its notifications are written in the event's own batch), unread counts, pushers
//! and delivery to HTTP push gateways.

mod gateway;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use futures_util::FutureExt;
use ruma::{
    Int, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    power_levels::NotificationPowerLevels,
    push::{Action, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

pub use gateway::Delivery;

use crate::{
    error::{Error, Result},
    events::Pdu,
    store::{Batch, Key, KeyReader, Store, StreamPos, tables},
};

/// The account data type that holds a user's push rules.
pub const PUSH_RULES: &str = "m.push_rules";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Notification {
    pub room_id: OwnedRoomId,
    pub event_id: OwnedEventId,
    pub ts: u64,
    pub highlight: bool,
    pub actions: Vec<Action>,
}

/// What push evaluation needs to know about the room at an event.
pub struct RoomContext<'a> {
    pub room_id: OwnedRoomId,
    /// Local users to evaluate for, with their display name in the room.
    pub recipients: Vec<(OwnedUserId, String)>,
    pub member_count: u64,
    pub power_levels: Option<JsonValue>,
    pub rules: &'a ruma::room_version_rules::AuthorizationRules,
    pub creators: Vec<OwnedUserId>,
}

pub struct Push {
    store: Arc<Store>,
    rulesets: Mutex<HashMap<OwnedUserId, Arc<Ruleset>>>,
    delivery: Delivery,
}

fn notification_key(user_id: &UserId, pos: StreamPos) -> Vec<u8> {
    Key::new().str(user_id.as_str()).u64(pos).into_vec()
}

fn room_notification_key(user_id: &UserId, room_id: &RoomId, pos: StreamPos) -> Vec<u8> {
    Key::new().str(user_id.as_str()).str(room_id.as_str()).u64(pos).into_vec()
}

fn power_levels_ctx(content: &JsonValue, rules: &ruma::room_version_rules::AuthorizationRules, creators: Vec<OwnedUserId>) -> PushConditionPowerLevelsCtx {
    let int = |v: Option<&JsonValue>, default: i64| Int::new(v.and_then(JsonValue::as_i64).unwrap_or(default)).unwrap_or_default();
    let users = content
        .get("users")
        .and_then(JsonValue::as_object)
        .map(|users| {
            users
                .iter()
                .filter_map(|(user, level)| Some((OwnedUserId::try_from(user.as_str()).ok()?, int(Some(level), 0))))
                .collect()
        })
        .unwrap_or_default();
    let mut notifications = NotificationPowerLevels::new();
    notifications.room = int(content.get("notifications").and_then(|n| n.get("room")), 50);
    PushConditionPowerLevelsCtx::new(users, int(content.get("users_default"), 0), notifications, RoomPowerLevelsRules::new(rules, creators))
}

impl Push {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store, rulesets: Mutex::default(), delivery: Delivery::start() }
    }

    /// The user's rules: what they saved, or the spec's defaults.
    pub fn ruleset(&self, user_id: &UserId) -> Result<Arc<Ruleset>> {
        if let Some(rules) = self.rulesets.lock().expect("ruleset cache").get(user_id) {
            return Ok(rules.clone());
        }
        let key = Key::new().str(user_id.as_str()).str("").str(PUSH_RULES).into_vec();
        let stored: Option<crate::users::AccountDataEntry> = self.store.get_json(tables::ACCOUNT_DATA, &key)?;
        let rules = stored
            .and_then(|entry| entry.content.get("global").cloned())
            .and_then(|global| serde_json::from_value::<Ruleset>(global).ok())
            .unwrap_or_else(|| Ruleset::server_default(user_id));
        let rules = Arc::new(rules);
        self.rulesets.lock().expect("ruleset cache").insert(user_id.to_owned(), rules.clone());
        Ok(rules)
    }

    /// The account data content for a ruleset.
    pub fn ruleset_content(rules: &Ruleset) -> JsonValue {
        json!({ "global": rules })
    }

    /// Forgets the cached rules after the user changed them.
    pub fn invalidate(&self, user_id: &UserId) {
        self.rulesets.lock().expect("ruleset cache").remove(user_id);
    }

    /// Evaluates the rules of every recipient for `pdu` and stages the notifications in the
    /// event's batch. Returns them for delivery to push gateways after the commit.
    pub fn stage_event(&self, batch: &mut Batch, pdu: &Pdu, pos: StreamPos, room: &RoomContext<'_>) -> Result<Vec<(OwnedUserId, Notification)>> {
        let raw: Raw<JsonValue> = Raw::new(&pdu.to_client_event(None, true)).map_err(Error::internal)?;
        let power_levels = room.power_levels.as_ref().map(|p| power_levels_ctx(p, room.rules, room.creators.clone()));
        let mut staged = Vec::new();
        for (user_id, display_name) in &room.recipients {
            if *user_id == pdu.sender {
                continue;
            }
            let rules = self.ruleset(user_id)?;
            let mut context = PushConditionRoomCtx::new(
                room.room_id.clone(),
                UInt::new(room.member_count).unwrap_or_default(),
                user_id.clone(),
                display_name.clone(),
            );
            context.power_levels = power_levels.clone();
            // Evaluation is only asynchronous for thread subscriptions, which are not used.
            let Some(actions) = rules.get_actions(&raw, &context).now_or_never() else { continue };
            if !actions.iter().any(Action::should_notify) {
                continue;
            }
            let notification = Notification {
                room_id: room.room_id.clone(),
                event_id: pdu.event_id.clone(),
                ts: pdu.origin_server_ts.0.into(),
                highlight: actions.iter().any(Action::is_highlight),
                actions: actions.to_vec(),
            };
            batch.put_json(&self.store, tables::NOTIFICATIONS, &notification_key(user_id, pos), &notification)?;
            batch.put_json(&self.store, tables::ROOM_NOTIFICATIONS, &room_notification_key(user_id, &room.room_id, pos), &notification.highlight)?;
            staged.push((user_id.clone(), notification));
        }
        Ok(staged)
    }

    /// Stages the removal of a user's notifications in a room (when the room is purged).
    pub fn stage_room_removal(&self, batch: &mut Batch, user_id: &UserId, room_id: &RoomId) -> Result<()> {
        let prefix = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        for item in self.store.scan_prefix(tables::ROOM_NOTIFICATIONS, prefix, false) {
            let (key, _) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.str();
            if let Some(pos) = reader.u64() {
                batch.delete(&self.store, tables::NOTIFICATIONS, &notification_key(user_id, pos));
            }
            batch.delete(&self.store, tables::ROOM_NOTIFICATIONS, &key);
        }
        Ok(())
    }

    /// Stages the removal of a user's notification for the event at `pos`, if there is one.
    pub fn stage_event_removal(&self, batch: &mut Batch, user_id: &UserId, room_id: &RoomId, pos: StreamPos) {
        batch.delete(&self.store, tables::NOTIFICATIONS, &notification_key(user_id, pos));
        batch.delete(&self.store, tables::ROOM_NOTIFICATIONS, &room_notification_key(user_id, room_id, pos));
    }

    /// Notification and highlight counts of a room after `read_pos` (capped at 99).
    pub fn unread_counts(&self, user_id: &UserId, room_id: &RoomId, read_pos: StreamPos) -> Result<(u64, u64)> {
        const CAP: u64 = 99;
        let prefix = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        let start = room_notification_key(user_id, room_id, read_pos.saturating_add(1));
        let (mut notifications, mut highlights) = (0, 0);
        for item in self.store.scan_from(tables::ROOM_NOTIFICATIONS, prefix, &start, false) {
            let (_, highlight) = item?;
            notifications += 1;
            if crate::store::decode::<bool>(tables::ROOM_NOTIFICATIONS, &highlight)? {
                highlights += 1;
            }
            if notifications >= CAP {
                break;
            }
        }
        Ok((notifications, highlights))
    }

    /// The newest notifications at or before `from`, newest first: (position, notification).
    pub fn notifications(&self, user_id: &UserId, from: StreamPos, limit: usize, only_highlight: bool) -> Result<Vec<(StreamPos, Notification)>> {
        let prefix = Key::new().str(user_id.as_str()).into_vec();
        let start = notification_key(user_id, from);
        let mut out = Vec::new();
        for item in self.store.scan_from(tables::NOTIFICATIONS, prefix, &start, true) {
            let (key, value) = item?;
            let pos = KeyReader::new(&key).skip_str().u64().unwrap_or(0);
            let notification: Notification = crate::store::decode(tables::NOTIFICATIONS, &value)?;
            if only_highlight && !notification.highlight {
                continue;
            }
            out.push((pos, notification));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    // --- pushers ---

    pub fn pushers(&self, user_id: &UserId) -> Result<Vec<JsonValue>> {
        let prefix = Key::new().str(user_id.as_str()).into_vec();
        self.store
            .scan_prefix(tables::PUSHERS, prefix, false)
            .map(|item| Ok(crate::store::decode(tables::PUSHERS, &item?.1)?))
            .collect()
    }

    /// Adds, replaces or (with `kind: null`) removes a pusher.
    pub fn set_pusher(&self, user_id: &UserId, pusher: &JsonValue) -> Result<()> {
        let field = |name: &str| pusher.get(name).and_then(JsonValue::as_str).ok_or_else(|| Error::new(crate::error::ErrorCode::MissingParam, format!("missing {name}")));
        let app_id = field("app_id")?;
        let pushkey = field("pushkey")?;
        let key = Key::new().str(user_id.as_str()).str(app_id).str(pushkey).into_vec();
        let mut batch = self.store.batch();
        if pusher.get("kind").is_none_or(JsonValue::is_null) {
            batch.delete(&self.store, tables::PUSHERS, &key);
        } else {
            if field("kind")? == "http" {
                let url = pusher.get("data").and_then(|d| d.get("url")).and_then(JsonValue::as_str);
                if !url.is_some_and(|u| u.ends_with("/_matrix/push/v1/notify") && (u.starts_with("http://") || u.starts_with("https://"))) {
                    return Err(Error::invalid_param("data.url must be an http(s) URL ending in /_matrix/push/v1/notify"));
                }
            }
            for name in ["app_display_name", "device_display_name", "lang"] {
                field(name)?;
            }
            batch.put_json(&self.store, tables::PUSHERS, &key, pusher)?;
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Hands committed notifications to the push gateways of their users' HTTP pushers.
    pub fn deliver(&self, notifications: Vec<(OwnedUserId, Notification)>, event: &Pdu, counts: impl Fn(&UserId) -> u64) {
        let mut by_url: BTreeMap<String, Vec<JsonValue>> = BTreeMap::new();
        for (user_id, notification) in notifications {
            if !notification.actions.iter().any(|a| matches!(a, Action::Notify)) {
                continue;
            }
            let Ok(pushers) = self.pushers(&user_id) else { continue };
            for pusher in pushers.iter().filter(|p| p.get("kind").and_then(JsonValue::as_str) == Some("http")) {
                let Some(url) = pusher.get("data").and_then(|d| d.get("url")).and_then(JsonValue::as_str) else { continue };
                let tweaks: serde_json::Map<String, JsonValue> = notification
                    .actions
                    .iter()
                    .filter_map(|a| match serde_json::to_value(a).ok()? {
                        JsonValue::Object(o) if o.get("set_tweak").is_some() => {
                            Some((o.get("set_tweak")?.as_str()?.to_owned(), o.get("value").cloned().unwrap_or(json!(true))))
                        }
                        _ => None,
                    })
                    .collect();
                let mut data = pusher.get("data").cloned().unwrap_or_else(|| json!({}));
                if let Some(data) = data.as_object_mut() {
                    data.remove("url");
                }
                let event_only = pusher.get("data").and_then(|d| d.get("format")).and_then(JsonValue::as_str) == Some("event_id_only");
                let mut body = json!({
                    "event_id": event.event_id,
                    "room_id": event.room_id,
                    "counts": { "unread": counts(&user_id) },
                    "prio": if notification.highlight { "high" } else { "low" },
                    "devices": [{
                        "app_id": pusher.get("app_id"),
                        "pushkey": pusher.get("pushkey"),
                        "pushkey_ts": 0,
                        "data": data,
                        "tweaks": tweaks,
                    }],
                });
                if !event_only {
                    body["type"] = json!(event.kind.to_string());
                    body["sender"] = json!(event.sender);
                    body["content"] = event.content_json();
                    body["user_is_target"] = json!(event.state_key.as_deref() == Some(user_id.as_str()));
                }
                by_url.entry(url.to_owned()).or_default().push(json!({ "notification": body }));
            }
        }
        for (url, bodies) in by_url {
            for body in bodies {
                self.delivery.send(url.clone(), body);
            }
        }
    }
}
