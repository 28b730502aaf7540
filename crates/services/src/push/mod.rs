//! Push: each user's push rules (the spec's defaults plus their own), rule evaluation for every
//! new event (its notifications are written in the event's own batch), unread counts, pushers
//! (each belongs to the access token that set it and ends with it) and delivery to HTTP push
//! gateways.

mod gateway;

use std::{
    collections::{BTreeMap, BinaryHeap, HashMap},
    sync::{Arc, Mutex},
};

use futures_util::FutureExt;
use ruma::{
    Int, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    power_levels::NotificationPowerLevels,
    push::{Action, AnyPushRuleRef, FlattenedJson, PushCondition, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    room_version_rules::RoomPowerLevelsRules,
    serde::Raw,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, json};

pub use gateway::Delivery;

use crate::{
    config::PushConfig,
    error::{Error, Result},
    events::Pdu,
    store::{Announced, Batch, Key, KeyReader, Kept, Store, StreamPos, tables},
    users::Caller,
};

/// The only path a push gateway is posted to (the push gateway API's).
const GATEWAY_PATH: &str = "/_matrix/push/v1/notify";

/// A pusher as stored: what the client set, as `GET /pushers` shows it, and the sha256 of the
/// access token that set it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum StoredPusher {
    Owned { pusher: JsonValue, owner_token: String },
    /// Set before pushers recorded their token: it ends when the user is signed out of every
    /// other session (`users::Users::stage_unowned_pushers_removal`).
    Unowned(JsonValue),
}

impl StoredPusher {
    fn owner(&self) -> Option<&str> {
        match self {
            Self::Owned { owner_token, .. } => Some(owner_token),
            Self::Unowned(_) => None,
        }
    }

    fn into_pusher(self) -> JsonValue {
        match self {
            Self::Owned { pusher, .. } | Self::Unowned(pusher) => pusher,
        }
    }
}

/// The user's pushers with their store keys.
fn stored_pushers(store: &Store, user_id: &UserId) -> Result<Vec<(Box<[u8]>, StoredPusher)>> {
    let prefix = Key::new().str(user_id.as_str()).into_vec();
    store
        .scan_prefix(tables::PUSHERS, prefix, false)
        .map(|item| {
            let (key, value) = item?;
            Ok((key, crate::store::decode(tables::PUSHERS, &value)?))
        })
        .collect()
}

/// Stages the removal of the user's pushers whose owner token (`None`: unknown) `ends` selects;
/// the users module calls it wherever access tokens end.
fn stage_pushers_removal(store: &Store, batch: &mut Batch, user_id: &UserId, ends: impl Fn(Option<&str>) -> bool) -> Result<()> {
    for (key, pusher) in stored_pushers(store, user_id)? {
        if ends(pusher.owner()) {
            batch.delete(tables::PUSHERS, &key);
            batch.announce(tables::PUSHERS, &key);
        }
    }
    Ok(())
}

/// Whether `url` is where a push gateway is reached: `http(s)`, a host, the API's exact path.
fn is_gateway_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some_and(|h| !h.is_empty()) && url.path() == GATEWAY_PATH)
}

/// The account data type that holds a user's push rules.
pub const PUSH_RULES: &str = "m.push_rules";

/// A user's notification: the room, and the actions of the rule that applied to the event at
/// its stream position (the room's timeline event there).
///
/// One is stored for every recipient of every message, and their rows are most of what a
/// message in a large room writes: so each is one row, under the user, the room and the
/// position (what unread counts scan), holding the actions only. Rows written before hold only
/// whether they highlight, with the actions in a second row per notification, under the user
/// and the position (in this form, or with the event's id and time too); those still read.
#[derive(Clone, Debug, Deserialize)]
pub struct Notification {
    #[serde(rename = "r", alias = "room_id")]
    pub room_id: OwnedRoomId,
    #[serde(rename = "a", alias = "actions")]
    pub actions: Vec<Action>,
}

impl Notification {
    pub fn highlights(&self) -> bool {
        highlights(&self.actions)
    }
}

fn highlights(actions: &[Action]) -> bool {
    actions.iter().any(Action::is_highlight)
}

/// A room notification row's value.
enum StoredNotification {
    Actions(Vec<Action>),
    /// A row written before actions were kept in it: whether it highlights.
    Highlight(bool),
}

impl StoredNotification {
    fn decode(value: &[u8]) -> Result<Self> {
        if value.first() == Some(&b'[') {
            Ok(Self::Actions(crate::store::decode(tables::ROOM_NOTIFICATIONS, value)?))
        } else {
            Ok(Self::Highlight(crate::store::decode(tables::ROOM_NOTIFICATIONS, value)?))
        }
    }

    fn highlights(&self) -> bool {
        match self {
            Self::Actions(actions) => highlights(actions),
            Self::Highlight(highlight) => *highlight,
        }
    }
}

/// What push evaluation needs to know about the room at an event. It depends on the room's state
/// alone (for events that change none), so the notifier keeps it per state snapshot.
pub struct RoomContext {
    pub room_id: OwnedRoomId,
    /// Local users to evaluate for, with their display name in the room.
    pub recipients: Vec<(OwnedUserId, String)>,
    pub member_count: u64,
    pub power_levels: Option<PushConditionPowerLevelsCtx>,
}

/// A user's push rules, with what lets a rule's outcome at an event be found without ruma
/// evaluating it for each recipient (a message to a room of N members is evaluated against
/// N − 1 rulesets, mostly the spec's defaults).
pub struct UserRules {
    pub ruleset: Arc<Ruleset>,
    /// For each rule in the ruleset's order.
    shortcuts: Vec<Shortcut>,
}

/// How a rule's outcome at an event may be found before, or instead of, evaluating it.
enum Shortcut {
    /// An override or underride rule that applies or not by the event and the room alone (the
    /// sender is never a recipient, and only a display name condition reads the recipient):
    /// `rule`, a fingerprint of its kind, id, enabled flag and conditions, is evaluated once per
    /// event for everyone who has it as it is. `conditions` are its conditions' fingerprints.
    Shared { rule: u64, conditions: Vec<u64> },
    /// An override or underride rule with a display name condition: the fingerprints of its
    /// other conditions.
    Conditions(Vec<u64>),
    /// A content rule whose pattern has no wildcard, lowercased: it matches words of the body,
    /// so never a body that does not contain it.
    Literal(String),
    /// Evaluated as it is.
    None,
}

/// What the recipients of one event share: whether each fingerprinted rule or condition holds
/// (fingerprints are hashes already), and the event's body lowercased.
#[derive(Default)]
struct SharedAtEvent {
    outcomes: HashMap<u64, bool, std::hash::BuildHasherDefault<Fingerprint>>,
    body: Option<Option<String>>,
}

/// A hasher for keys that are hashes.
#[derive(Default)]
struct Fingerprint(u64);

impl std::hash::Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

fn fingerprint(what: impl std::hash::Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    what.hash(&mut hasher);
    hasher.finish()
}

impl UserRules {
    fn new(ruleset: Ruleset) -> Self {
        #[allow(deprecated)]
        let by_name = |condition: &PushCondition| matches!(condition, PushCondition::ContainsDisplayName);
        let shortcuts = ruleset
            .iter()
            .map(|rule| {
                let (kind, rule) = match rule {
                    AnyPushRuleRef::Override(rule) => ("override", rule),
                    AnyPushRuleRef::Underride(rule) => ("underride", rule),
                    AnyPushRuleRef::Content(rule) if !rule.pattern.contains(['*', '?']) => return Shortcut::Literal(rule.pattern.to_lowercase()),
                    _ => return Shortcut::None,
                };
                let Ok(conditions) = rule.conditions.iter().filter(|c| !by_name(c)).map(|c| serde_json::to_string(c).map(|c| fingerprint(("condition", c)))).collect::<Result<Vec<u64>, _>>() else {
                    return Shortcut::None;
                };
                if rule.conditions.iter().any(by_name) {
                    return Shortcut::Conditions(conditions);
                }
                // The rule id too: ruma treats some predefined rules apart by their id.
                match serde_json::to_string(&rule.conditions) {
                    Ok(all) => Shortcut::Shared { rule: fingerprint((kind, rule.rule_id.as_str(), rule.enabled, all)), conditions },
                    Err(_) => Shortcut::None,
                }
            })
            .collect();
        Self { ruleset: Arc::new(ruleset), shortcuts }
    }

    /// The actions of the first rule that applies to `event`, as ruma's `Ruleset::get_actions`
    /// finds them, on an event flattened beforehand; `shared` holds what the recipients before
    /// this one found that the ones after it may reuse.
    fn first_match(&self, event: &FlattenedJson, context: &PushConditionRoomCtx, shared: &mut SharedAtEvent) -> Option<&[Action]> {
        // Evaluation is only asynchronous for thread subscriptions, which are not used.
        let applies = |rule: &AnyPushRuleRef<'_>| rule.applies(event, context).now_or_never();
        for (rule, shortcut) in self.ruleset.iter().zip(&self.shortcuts) {
            let applied = match shortcut {
                Shortcut::Shared { rule: fingerprint, conditions } => match shared.outcomes.get(fingerprint) {
                    Some(&known) => known,
                    None => {
                        let applied = Self::conditions_hold(&rule, conditions, event, context, shared)? && applies(&rule)?;
                        shared.outcomes.insert(*fingerprint, applied);
                        applied
                    }
                },
                Shortcut::Conditions(conditions) => Self::conditions_hold(&rule, conditions, event, context, shared)? && applies(&rule)?,
                Shortcut::Literal(pattern) => {
                    let body = shared.body.get_or_insert_with(|| event.get_str("content.body").map(str::to_lowercase));
                    body.as_deref().is_some_and(|body| body.contains(pattern.as_str())) && applies(&rule)?
                }
                Shortcut::None => applies(&rule)?,
            };
            if applied {
                return Some(rule.actions());
            }
        }
        Some(&[])
    }

    /// Whether each of a rule's conditions (but a display name one) holds, each evaluated once
    /// per event: a rule applies only if all of them do.
    fn conditions_hold(rule: &AnyPushRuleRef<'_>, fingerprints: &[u64], event: &FlattenedJson, context: &PushConditionRoomCtx, shared: &mut SharedAtEvent) -> Option<bool> {
        let all = match rule {
            AnyPushRuleRef::Override(rule) | AnyPushRuleRef::Underride(rule) => rule.conditions.as_slice(),
            _ => &[],
        };
        #[allow(deprecated)]
        let conditions = all.iter().filter(|c| !matches!(c, PushCondition::ContainsDisplayName));
        for (condition, fingerprint) in conditions.zip(fingerprints) {
            let holds = match shared.outcomes.get(fingerprint) {
                Some(&known) => known,
                None => {
                    let holds = condition.applies(event, context).now_or_never()?;
                    shared.outcomes.insert(*fingerprint, holds);
                    holds
                }
            };
            if !holds {
                return Some(false);
            }
        }
        Some(true)
    }
}

pub struct Push {
    store: Arc<Store>,
    rulesets: Arc<Kept<OwnedUserId, Arc<UserRules>>>,
    pushers: Arc<Kept<OwnedUserId, Arc<[StoredPusher]>>>,
    delivery: Delivery,
}

/// At most this many users' rules (or pushers) are kept; beyond it, all are read again as used.
const USERS_KEPT: usize = 50_000;

/// What is kept of each of `users` (their push rules, their pushers) until a change to it is
/// announced, `read` (without the lock, in one go) for those of whom nothing is.
fn kept_for<V: Clone + Send + 'static>(kept: &Kept<OwnedUserId, V>, users: &[&UserId], read: impl FnOnce(&[OwnedUserId]) -> Result<Vec<V>>) -> Result<Vec<V>> {
    let keys: Vec<OwnedUserId> = users.iter().map(|user| (*user).to_owned()).collect();
    let values = kept.get_many(&keys, |wanted| read(wanted).map(|values| values.into_iter().map(Some).collect()))?;
    values.into_iter().map(|value| value.ok_or_else(|| Error::internal("a user's kept push settings were not read"))).collect()
}

/// The account data key of a user's rules.
fn rules_key(user_id: &UserId) -> Vec<u8> {
    Key::new().str(user_id.as_str()).str("").str(PUSH_RULES).into_vec()
}

/// Whose rules a changed account data key holds, if it holds rules.
fn rules_owner(key: &[u8]) -> Announced<OwnedUserId> {
    let mut reader = KeyReader::new(key);
    let (Some(user), Some(room), Some(kind)) = (reader.str(), reader.str(), reader.str()) else { return Announced::Everything };
    if !room.is_empty() || kind != PUSH_RULES {
        return Announced::Nothing;
    }
    UserId::parse(user).map_or(Announced::Everything, Announced::One)
}

/// Whose pusher a changed pushers key holds.
fn pusher_owner(key: &[u8]) -> Announced<OwnedUserId> {
    KeyReader::new(key).str().and_then(|user| UserId::parse(user).ok()).map_or(Announced::Everything, Announced::One)
}

fn notification_key(user_id: &UserId, pos: StreamPos) -> Vec<u8> {
    Key::new().str(user_id.as_str()).u64(pos).into_vec()
}

fn room_notification_key(user_id: &UserId, room_id: &RoomId, pos: StreamPos) -> Vec<u8> {
    Key::new().str(user_id.as_str()).str(room_id.as_str()).u64(pos).into_vec()
}

/// The next row of a scan of a user's notifications in a room: its position and value.
fn next_notification(scan: &mut impl Iterator<Item = crate::store::Result<crate::store::Entry>>) -> Result<Option<(StreamPos, Box<[u8]>)>> {
    let Some(item) = scan.next() else { return Ok(None) };
    let (key, value) = item?;
    Ok(Some((KeyReader::new(&key).skip_str().skip_str().u64().unwrap_or(0), value)))
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
    pub fn new(store: Arc<Store>, config: &PushConfig) -> Self {
        Self {
            rulesets: Kept::watching(&store, tables::ACCOUNT_DATA, USERS_KEPT, rules_owner),
            pushers: Kept::watching(&store, tables::PUSHERS, USERS_KEPT, pusher_owner),
            store,
            delivery: Delivery::start(config),
        }
    }

    /// The user's rules: what they saved, or the spec's defaults.
    pub fn ruleset(&self, user_id: &UserId) -> Result<Arc<Ruleset>> {
        Ok(self.rulesets(&[user_id])?.remove(0).ruleset.clone())
    }

    /// The rules of each of `users`, kept once read until they change (a change to a user's
    /// global account data is announced: [`Users::set_account_data`](crate::users::Users::set_account_data)).
    fn rulesets(&self, users: &[&UserId]) -> Result<Vec<Arc<UserRules>>> {
        kept_for(&self.rulesets, users, |users| {
            let keys: Vec<Vec<u8>> = users.iter().map(|user| rules_key(user)).collect();
            let stored = self.store.get_many(tables::ACCOUNT_DATA, &keys.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
            users
                .iter()
                .zip(stored)
                .map(|(user, raw)| {
                    let entry: Option<crate::users::AccountDataEntry> = raw.as_deref().map(|bytes| crate::store::decode(tables::ACCOUNT_DATA, bytes)).transpose()?;
                    let rules = entry
                        .and_then(|entry| entry.content.get("global").cloned())
                        .and_then(|global| serde_json::from_value::<Ruleset>(global).ok())
                        .unwrap_or_else(|| Ruleset::server_default(user));
                    Ok(Arc::new(UserRules::new(rules)))
                })
                .collect()
        })
    }

    /// The account data content for a ruleset.
    pub fn ruleset_content(rules: &Ruleset) -> JsonValue {
        json!({ "global": rules })
    }

    /// Evaluates the rules of every recipient for `pdu` and stages the notifications in the
    /// event's batch. Returns them for delivery to push gateways after the commit.
    pub fn stage_event(&self, batch: &mut Batch, pdu: &Pdu, pos: StreamPos, room: &RoomContext) -> Result<Vec<(OwnedUserId, Notification)>> {
        let raw: Raw<JsonValue> = Raw::new(&pdu.to_client_event(None, true)).map_err(Error::internal)?;
        // Flattened once for all recipients (ruma's `get_actions` would for each).
        let event = FlattenedJson::from_raw(&raw);
        let mut staged = Vec::new();
        let recipients: Vec<&(OwnedUserId, String)> = room.recipients.iter().filter(|(user_id, _)| *user_id != pdu.sender).collect();
        let rulesets = self.rulesets(&recipients.iter().map(|(user_id, _)| user_id.as_ref()).collect::<Vec<_>>())?;
        // One context for all recipients, with each one's name in it in turn.
        let mut context = PushConditionRoomCtx::new(room.room_id.clone(), UInt::new(room.member_count).unwrap_or_default(), pdu.sender.clone(), String::new());
        context.power_levels = room.power_levels.clone();
        let mut shared = SharedAtEvent::default();
        for ((user_id, display_name), rules) in recipients.into_iter().zip(rulesets) {
            context.user_id.clone_from(user_id);
            context.user_display_name.clone_from(display_name);
            let Some(actions) = rules.first_match(&event, &context, &mut shared) else { continue };
            if !actions.iter().any(Action::should_notify) {
                continue;
            }
            batch.put_json(tables::ROOM_NOTIFICATIONS, &room_notification_key(user_id, &room.room_id, pos), &actions)?;
            staged.push((user_id.clone(), Notification { room_id: room.room_id.clone(), actions: actions.to_vec() }));
        }
        Ok(staged)
    }

    /// Stages the removal of a user's notifications in a room (when the room is purged).
    pub fn stage_room_removal(&self, batch: &mut Batch, user_id: &UserId, room_id: &RoomId) -> Result<()> {
        let prefix = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        for item in self.store.scan_prefix(tables::ROOM_NOTIFICATIONS, prefix, false) {
            let (key, value) = item?;
            let mut reader = KeyReader::new(&key);
            reader.str();
            reader.str();
            if let Some(pos) = reader.u64()
                && matches!(StoredNotification::decode(&value), Ok(StoredNotification::Highlight(_)))
            {
                batch.delete(tables::NOTIFICATIONS, &notification_key(user_id, pos));
            }
            batch.delete(tables::ROOM_NOTIFICATIONS, &key);
        }
        Ok(())
    }

    /// Stages the removal of a user's notification for the event at `pos`, if there is one.
    pub fn stage_event_removal(&self, batch: &mut Batch, user_id: &UserId, room_id: &RoomId, pos: StreamPos) {
        batch.delete(tables::NOTIFICATIONS, &notification_key(user_id, pos));
        batch.delete(tables::ROOM_NOTIFICATIONS, &room_notification_key(user_id, room_id, pos));
    }

    /// Notification and highlight counts of a room after `read_pos` (capped at 99).
    pub fn unread_counts(&self, user_id: &UserId, room_id: &RoomId, read_pos: StreamPos) -> Result<(u64, u64)> {
        const CAP: u64 = 99;
        let prefix = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
        let start = room_notification_key(user_id, room_id, read_pos.saturating_add(1));
        let (mut notifications, mut highlights) = (0, 0);
        for item in self.store.scan_from(tables::ROOM_NOTIFICATIONS, prefix, &start, false) {
            let (_, value) = item?;
            notifications += 1;
            if StoredNotification::decode(&value)?.highlights() {
                highlights += 1;
            }
            if notifications >= CAP {
                break;
            }
        }
        Ok((notifications, highlights))
    }

    /// The newest notifications at or before `from`, newest first: (position, notification).
    /// Each room's are in position order under the user and the room: the newest of each room
    /// the user has any in are merged.
    pub fn notifications(&self, user_id: &UserId, from: StreamPos, limit: usize, only_highlight: bool) -> Result<Vec<(StreamPos, Notification)>> {
        let user_prefix = Key::new().str(user_id.as_str()).into_vec();
        let room_of = |key: &[u8]| {
            let mut reader = KeyReader::new(key);
            let user = reader.str()?;
            Some(Key::new().str(user).str(reader.str()?).into_vec())
        };
        let mut rooms = Vec::new();
        for item in self.store.first_of_each(tables::ROOM_NOTIFICATIONS, user_prefix, room_of) {
            let (key, _) = item?;
            let Some(room_id) = KeyReader::new(&key).skip_str().str().and_then(|room| OwnedRoomId::try_from(room).ok()) else { continue };
            let prefix = Key::new().str(user_id.as_str()).str(room_id.as_str()).into_vec();
            let newest = self.store.scan_from(tables::ROOM_NOTIFICATIONS, prefix, &room_notification_key(user_id, &room_id, from), true);
            rooms.push((room_id, newest));
        }
        let mut heads = BinaryHeap::new();
        for (room, (_, newest)) in rooms.iter_mut().enumerate() {
            if let Some((pos, value)) = next_notification(newest)? {
                heads.push((pos, room, value));
            }
        }
        let mut out = Vec::new();
        while out.len() < limit
            && let Some((pos, room, value)) = heads.pop()
        {
            if let Some((next, next_value)) = next_notification(&mut rooms[room].1)? {
                heads.push((next, room, next_value));
            }
            let stored = StoredNotification::decode(&value)?;
            if only_highlight && !stored.highlights() {
                continue;
            }
            let actions = match stored {
                StoredNotification::Actions(actions) => actions,
                StoredNotification::Highlight(_) => match self.store.get(tables::NOTIFICATIONS, &notification_key(user_id, pos))? {
                    Some(stored) => crate::store::decode::<Notification>(tables::NOTIFICATIONS, &stored)?.actions,
                    None => continue,
                },
            };
            out.push((pos, Notification { room_id: rooms[room].0.clone(), actions }));
        }
        Ok(out)
    }

    // --- pushers ---

    /// The user's pushers, but for any whose token has ended (a pusher set while its token was
    /// being revoked escapes the removal; it never receives anything).
    pub fn pushers(&self, user_id: &UserId) -> Result<Vec<JsonValue>> {
        let kept = kept_for(&self.pushers, &[user_id], |users| {
            users.iter().map(|user| Ok(stored_pushers(&self.store, user)?.into_iter().map(|(_, pusher)| pusher).collect())).collect()
        })?;
        let mut live = Vec::new();
        for pusher in kept[0].iter() {
            if let Some(owner) = pusher.owner()
                && !crate::users::token_is_live(&self.store, owner)?
            {
                continue;
            }
            live.push(pusher.clone().into_pusher());
        }
        Ok(live)
    }

    /// Adds, replaces or (with `kind: null`) removes a pusher; an added or replaced pusher
    /// belongs to the caller's access token.
    pub fn set_pusher(&self, caller: &Caller, pusher: &JsonValue) -> Result<()> {
        let field = |name: &str| pusher.get(name).and_then(JsonValue::as_str).ok_or_else(|| Error::new(crate::error::ErrorCode::MissingParam, format!("missing {name}")));
        let app_id = field("app_id")?;
        let pushkey = field("pushkey")?;
        let key = Key::new().str(caller.user_id.as_str()).str(app_id).str(pushkey).into_vec();
        let mut batch = self.store.batch();
        if pusher.get("kind").is_none_or(JsonValue::is_null) {
            batch.delete(tables::PUSHERS, &key);
        } else {
            if field("kind")? == "http" {
                let url = pusher.get("data").and_then(|d| d.get("url")).and_then(JsonValue::as_str);
                if !url.is_some_and(is_gateway_url) {
                    return Err(Error::invalid_param(format!("data.url must be an http(s) URL whose path is {GATEWAY_PATH}")));
                }
            }
            for name in ["app_display_name", "device_display_name", "lang"] {
                field(name)?;
            }
            let stored = StoredPusher::Owned { pusher: pusher.clone(), owner_token: caller.token_hash.clone() };
            batch.put_json(tables::PUSHERS, &key, &stored)?;
        }
        batch.announce(tables::PUSHERS, &key);
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
                    "prio": if notification.highlights() { "high" } else { "low" },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_rules_is_read_from_their_account_data_key() {
        let user = ruma::user_id!("@ben:x");
        assert_eq!(rules_owner(&rules_key(user)), Announced::One(user.to_owned()));
        let room_data = Key::new().str(user.as_str()).str("!room:x").str(PUSH_RULES).into_vec();
        assert_eq!(rules_owner(&room_data), Announced::Nothing, "room account data holds no rules");
        let other = Key::new().str(user.as_str()).str("").str("m.direct").into_vec();
        assert_eq!(rules_owner(&other), Announced::Nothing);
        assert_eq!(rules_owner(b"not a key"), Announced::Everything, "anything may have changed");
    }

    #[test]
    fn pushers_stored_before_owners_were_recorded_read_as_unowned() {
        let bare = json!({ "kind": "http", "app_id": "a", "pushkey": "k", "data": { "url": "https://gw.example/_matrix/push/v1/notify" } });
        let legacy: StoredPusher = serde_json::from_value(bare.clone()).unwrap();
        assert_eq!(legacy.owner(), None);
        assert_eq!(legacy.into_pusher(), bare);
        let owned = serde_json::to_value(StoredPusher::Owned { pusher: bare.clone(), owner_token: "hash".into() }).unwrap();
        let owned: StoredPusher = serde_json::from_value(owned).unwrap();
        assert_eq!(owned.owner(), Some("hash"));
        assert_eq!(owned.into_pusher(), bare);
    }

    /// Rules evaluated once per event for everyone who has them give each recipient what ruma's
    /// own evaluation gives: with mentions by display name and by id, and a rule of the same id
    /// but other conditions in two users' rules.
    #[test]
    fn rules_shared_between_recipients_give_each_what_their_own_rules_give() {
        use ruma::push::{EventMatchConditionData, NewConditionalPushRule, NewPatternedPushRule, NewPushRule};
        let room_id = ruma::owned_room_id!("!room:x");
        let users: Vec<OwnedUserId> = ["@ann:x", "@bob:x", "@cat:x", "@dan:x"].into_iter().map(|u| u.try_into().unwrap()).collect();
        let highlight = vec![Action::Notify, Action::SetTweak(ruma::push::Tweak::Highlight(ruma::push::HighlightTweakValue::Yes))];
        let matching = |key: &str, pattern: &str| PushCondition::EventMatch(EventMatchConditionData::new(key.into(), pattern.into()));
        let own_rule = |pattern: &str| NewPushRule::Override(NewConditionalPushRule::new("word".into(), vec![matching("content.body", pattern)], highlight.clone()));
        // Display name rules, as rules saved before the spec's defaults dropped them hold them:
        // alone, and after a condition on the event's type.
        #[allow(deprecated)]
        let name_rule = NewPushRule::Override(NewConditionalPushRule::new("name".into(), vec![PushCondition::ContainsDisplayName], highlight.clone()));
        #[allow(deprecated)]
        let message_name_rule = NewPushRule::Override(NewConditionalPushRule::new("name".into(), vec![matching("type", "m.room.message"), PushCondition::ContainsDisplayName], highlight.clone()));
        let word_rule = NewPushRule::Content(NewPatternedPushRule::new("word".into(), "SeCreT".into(), highlight.clone()));
        let rulesets: Vec<Ruleset> = users
            .iter()
            .map(|user| {
                let mut rules = Ruleset::server_default(user);
                match user.localpart() {
                    "ann" => rules.insert(message_name_rule.clone(), None, None).unwrap(),
                    "bob" => rules.insert(name_rule.clone(), None, None).unwrap(),
                    "cat" => rules.insert(own_rule("*secret*"), None, None).unwrap(),
                    _ => {
                        rules.insert(own_rule("*other*"), None, None).unwrap();
                        rules.insert(word_rule.clone(), None, None).unwrap();
                    }
                }
                rules
            })
            .collect();
        let powers = PushConditionPowerLevelsCtx::new(BTreeMap::new(), Int::from(0), NotificationPowerLevels::new(), RoomPowerLevelsRules::new(&ruma::room_version_rules::AuthorizationRules::V6, vec![]));
        let message = |content: JsonValue| json!({ "type": "m.room.message", "sender": "@sender:x", "room_id": room_id, "content": content });
        let events = [
            message(json!({ "msgtype": "m.text", "body": "a secret for Bobby" })),
            message(json!({ "msgtype": "m.text", "body": "hello", "m.mentions": { "user_ids": ["@ann:x"] } })),
            message(json!({ "msgtype": "m.text", "body": "hello @room" })),
            message(json!({ "msgtype": "m.text", "body": "nothing at all" })),
            // Names without `m.mentions` (older clients), in any case.
            message(json!({ "msgtype": "m.text", "body": "Are you there, ANN? And dan!" })),
            message(json!({ "msgtype": "m.notice", "body": "annual secrets" })),
            message(json!({ "msgtype": "m.text" })),
            json!({ "type": "m.room.member", "state_key": "@cat:x", "sender": "@sender:x", "room_id": room_id, "content": { "membership": "invite", "displayname": "ann" } }),
        ];
        for event in events {
            let raw: Raw<JsonValue> = Raw::new(&event).unwrap();
            let flattened = FlattenedJson::from_raw(&raw);
            let mut shared = SharedAtEvent::default();
            let mut seen = Vec::new();
            for (user, rules) in users.iter().zip(&rulesets) {
                let display_name = if user.localpart() == "bob" { "Bobby".to_owned() } else { user.localpart().to_owned() };
                let mut context = PushConditionRoomCtx::new(room_id.clone(), UInt::from(5u32), user.clone(), display_name);
                context.power_levels = Some(powers.clone());
                let expected = json!(rules.get_actions(&raw, &context).now_or_never().unwrap());
                let kept = UserRules::new(rules.clone());
                let got = json!(kept.first_match(&flattened, &context, &mut shared).unwrap());
                assert_eq!(got, expected, "{user} for {event}");
                seen.push(got.to_string().contains("highlight"));
            }
            assert!(!shared.outcomes.is_empty(), "no rule was shared");
            match event["content"]["body"].as_str() {
                // Bob's display name and Cat's own rule; not the rule Dan has under Cat's rule's id.
                Some("a secret for Bobby") => assert_eq!(seen, [false, true, true, true], "Dan's word, in another case"),
                Some("Are you there, ANN? And dan!") => assert_eq!(seen, [true, false, false, false], "Ann's name; Dan has no name rule"),
                _ => {}
            }
        }
    }

    /// `/notifications` merges the rooms' rows newest first, pages by position, reads rows
    /// written before (a highlight flag, the actions in a second row) beside new ones, and a
    /// room's removal takes both kinds of rows; counts read both.
    #[test]
    fn notifications_are_listed_newest_first_across_rooms_with_those_written_before() {
        let dir = tempfile::tempdir().unwrap();
        notifications_listed_across_rooms(Arc::new(Store::open(dir.path()).unwrap()));
        let url = limbic_test_postgres::TempPostgres::shared().new_database("notifications");
        notifications_listed_across_rooms(Arc::new(Store::open_postgres(&url, 4, "test").unwrap()));
    }

    fn notifications_listed_across_rooms(store: Arc<Store>) {
        let push = Push::new(store.clone(), &PushConfig::default());
        let (bob, ann) = (ruma::user_id!("@bob:x"), ruma::user_id!("@ann:x"));
        let (first, second, third) = (ruma::room_id!("!a:x"), ruma::room_id!("!ab:x"), ruma::room_id!("!b:x"));
        let notify = json!(["notify"]);
        let highlight = json!(["notify", { "set_tweak": "highlight" }]);
        let mut batch = store.batch();
        // Written before: positions 1 and 4 in the first room, the second highlighting.
        for (pos, actions) in [(1, &notify), (4, &highlight)] {
            batch.put_json(tables::ROOM_NOTIFICATIONS, &room_notification_key(bob, first, pos), &highlights(&serde_json::from_value::<Vec<Action>>(actions.clone()).unwrap())).unwrap();
            batch.put_json(tables::NOTIFICATIONS, &notification_key(bob, pos), &json!({ "r": first, "a": actions })).unwrap();
        }
        for (room, pos, actions) in [(second, 2, &highlight), (third, 3, &notify), (second, 5, &notify), (first, 6, &notify), (third, 7, &highlight)] {
            batch.put_json(tables::ROOM_NOTIFICATIONS, &room_notification_key(bob, room, pos), actions).unwrap();
        }
        // Another user's, whose name bob's does not start: never bob's.
        batch.put_json(tables::ROOM_NOTIFICATIONS, &room_notification_key(ann, first, 8), &notify).unwrap();
        store.write(batch).unwrap();

        let listed = |from: StreamPos, limit: usize, only_highlight: bool| -> Vec<(StreamPos, String, bool)> {
            push.notifications(bob, from, limit, only_highlight).unwrap().into_iter().map(|(pos, n)| (pos, n.room_id.to_string(), n.highlights())).collect()
        };
        let all = listed(u64::MAX, 20, false);
        let expected = [(7, "!b:x", true), (6, "!a:x", false), (5, "!ab:x", false), (4, "!a:x", true), (3, "!b:x", false), (2, "!ab:x", true), (1, "!a:x", false)];
        assert_eq!(all, expected.map(|(pos, room, highlight)| (pos, room.to_owned(), highlight)));
        // Pages of three, each from below the last one's position, give the same list.
        let mut paged = Vec::new();
        let mut from = u64::MAX;
        loop {
            let page = listed(from, 3, false);
            let Some(last) = page.last() else { break };
            from = last.0 - 1;
            paged.extend(page);
        }
        assert_eq!(paged, all);
        let only: Vec<StreamPos> = listed(u64::MAX, 20, true).into_iter().map(|(pos, _, _)| pos).collect();
        assert_eq!(only, [7, 4, 2]);
        assert_eq!(push.unread_counts(bob, first, 0).unwrap(), (3, 1));
        assert_eq!(push.unread_counts(bob, first, 4).unwrap(), (1, 0));

        let mut batch = store.batch();
        push.stage_room_removal(&mut batch, bob, first).unwrap();
        store.write(batch).unwrap();
        assert_eq!(listed(u64::MAX, 20, false).into_iter().map(|(pos, _, _)| pos).collect::<Vec<_>>(), [7, 5, 3, 2]);
        assert!(store.get(tables::NOTIFICATIONS, &notification_key(bob, 4)).unwrap().is_none(), "the second row written before goes too");
        assert_eq!(push.notifications(ann, u64::MAX, 20, false).unwrap().len(), 1);
    }

    #[test]
    fn notifications_are_stored_as_their_actions_and_those_stored_before_still_read() {
        let highlight = json!(["notify", { "set_tweak": "highlight" }]);
        let written = |actions: &JsonValue| StoredNotification::decode(&serde_json::to_vec(actions).unwrap()).unwrap();
        assert!(matches!(written(&highlight), StoredNotification::Actions(ref actions) if actions.len() == 2));
        assert!(written(&highlight).highlights());
        assert!(!written(&json!(["notify"])).highlights());
        // Room rows written before: whether they highlight; the actions in a second row, written
        // in full and then with the room and actions only.
        assert!(matches!(written(&json!(true)), StoredNotification::Highlight(true)));
        assert!(!written(&json!(false)).highlights());
        assert!(StoredNotification::decode(b"{}").is_err(), "neither actions nor a flag");
        for legacy in [json!({ "room_id": "!r:x", "event_id": "$e", "ts": 1, "highlight": true, "actions": highlight }), json!({ "r": "!r:x", "a": highlight })] {
            let read: Notification = serde_json::from_value(legacy).unwrap();
            assert_eq!(read.room_id, "!r:x");
            assert!(read.highlights());
        }
    }
}

/// Push rules evaluated for every event as it is staged: notification counts go into the
/// event's own write, and gateways are told once it is durable.
pub struct Notifier {
    push: Arc<Push>,
    server_name: ruma::OwnedServerName,
    /// Per room, its push context at one state snapshot (the newest seen), for the events that
    /// change no state: reading every member's event again for each message would cost
    /// O(members) store reads under the room's lock.
    contexts: Mutex<HashMap<OwnedRoomId, (StreamPos, Arc<RoomContext>)>>,
}

impl Notifier {
    /// Recipients kept across all rooms' contexts (a few MB); past this, the map starts again
    /// (a busy room's is read again at its next event).
    const RECIPIENTS_KEPT: usize = 100_000;

    pub fn new(push: Arc<Push>, server_name: ruma::OwnedServerName) -> Self {
        Self { push, server_name, contexts: Mutex::default() }
    }

    /// The room's push context at the event, kept for the events that change no state.
    fn context_at(&self, room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>) -> Result<Arc<RoomContext>> {
        if event.pdu.state_key.is_some() {
            return Ok(Arc::new(self.room_context(room, event.pdu)?));
        }
        let room_id = room.room_id();
        if let Some((state, context)) = self.contexts.lock().expect("push contexts").get(room_id)
            && *state == event.state
        {
            return Ok(context.clone());
        }
        let context = Arc::new(self.room_context(room, event.pdu)?);
        let mut contexts = self.contexts.lock().expect("push contexts");
        let kept: usize = contexts.values().map(|(_, kept)| kept.recipients.len()).sum();
        if kept + context.recipients.len() > Self::RECIPIENTS_KEPT {
            contexts.clear();
        }
        contexts.insert(room_id.to_owned(), (event.state, context.clone()));
        Ok(context)
    }

    /// Who push rules are evaluated for: local joined members after the event, and the
    /// target of an invite.
    fn room_context(&self, room: &dyn crate::rooms::RoomView, pdu: &Pdu) -> Result<RoomContext> {
        use crate::rooms::Membership;
        let members = room.members()?;
        let member_count = members.values().filter(|m| **m == Membership::Join).count() as u64;
        let mut recipients = Vec::new();
        for (user, membership) in &members {
            let invited_now = *membership == Membership::Invite && pdu.state_key.as_deref() == Some(user.as_str());
            if user.server_name() != self.server_name || !(*membership == Membership::Join || invited_now) {
                continue;
            }
            let display_name = room
                .state("m.room.member", user.as_str())?
                .and_then(|p| p.content_json().get("displayname").and_then(|d| d.as_str()).map(str::to_owned))
                .unwrap_or_else(|| user.localpart().to_owned());
            recipients.push((user.clone(), display_name));
        }
        let rules = room.rules()?;
        let creators = room.state("m.room.create", "")?.map(|create| crate::events::privileged_creators(&create, rules)).unwrap_or_default();
        let power_levels = room.state("m.room.power_levels", "")?.map(|p| power_levels_ctx(&p.content_json(), &rules.authorization, creators));
        Ok(RoomContext { room_id: room.room_id().to_owned(), recipients, member_count, power_levels })
    }
}

impl crate::rooms::Indexer for Notifier {
    fn stage(&self, room: &dyn crate::rooms::RoomView, event: &crate::rooms::StagedEvent<'_>, staging: &mut crate::rooms::Staging<'_>) -> Result<()> {
        let context = self.context_at(room, event)?;
        let notifications = self.push.stage_event(staging.batch(), event.pdu, event.pos, &context)?;
        if !notifications.is_empty() {
            let (push, pdu) = (self.push.clone(), event.pdu.clone());
            staging.after_commit(Box::new(move |rooms| {
                let counts = |user: &UserId| rooms.read_position(user, &pdu.room_id).and_then(|read| push.unread_counts(user, &pdu.room_id, read)).map_or(0, |(n, _)| n);
                push.deliver(notifications, &pdu, counts);
            }));
        }
        Ok(())
    }

    fn expired(&self, _store: &Store, batch: &mut Batch, room_id: &RoomId, _pdu: &Pdu, pos: StreamPos, members: &[OwnedUserId]) -> Result<()> {
        for user_id in members {
            self.push.stage_event_removal(batch, user_id, room_id, pos);
        }
        Ok(())
    }

    fn room_removed(&self, _store: &Store, batch: &mut Batch, room_id: &RoomId, members: &[OwnedUserId]) -> Result<()> {
        members.iter().try_for_each(|user_id| self.push.stage_room_removal(batch, user_id, room_id))
    }

    fn rest(&self) {
        self.contexts.lock().expect("push contexts").clear();
        self.push.rulesets.forget(None);
        self.push.pushers.forget(None);
    }
}

/// Pushers belong to the access token that set them and end with it.
impl crate::users::TokenBound for Push {
    fn stage_token_ended(&self, batch: &mut Batch, user_id: &UserId, token_hash: Option<&str>) -> Result<()> {
        stage_pushers_removal(&self.store, batch, user_id, |owner| owner == token_hash)
    }
}
