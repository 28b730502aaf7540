//! Sync and room event filters, read from their JSON definitions (stored or inline), and the
//! tokens of stream and history positions: what sync, /messages, search and relations share.

use serde_json::Value as JsonValue;

use crate::{error::{Error, Result}, events::Pdu, store::StreamPos};

/// A room event filter (the spec's RoomEventFilter), from its JSON form.
#[derive(Default, Clone, Debug)]
pub struct EventFilter {
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub limit: Option<usize>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    pub contains_url: Option<bool>,
}

fn strings(value: Option<&JsonValue>) -> Option<Vec<String>> {
    value.and_then(JsonValue::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
}

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

impl EventFilter {
    pub fn from_json(value: Option<&JsonValue>) -> Self {
        let Some(value) = value else { return Self::default() };
        Self {
            types: strings(value.get("types")),
            not_types: strings(value.get("not_types")).unwrap_or_default(),
            senders: strings(value.get("senders")),
            not_senders: strings(value.get("not_senders")).unwrap_or_default(),
            rooms: strings(value.get("rooms")),
            not_rooms: strings(value.get("not_rooms")).unwrap_or_default(),
            limit: value.get("limit").and_then(JsonValue::as_u64).map(|l| l as usize),
            lazy_load_members: value.get("lazy_load_members").and_then(JsonValue::as_bool).unwrap_or(false),
            include_redundant_members: value.get("include_redundant_members").and_then(JsonValue::as_bool).unwrap_or(false),
            contains_url: value.get("contains_url").and_then(JsonValue::as_bool),
        }
    }

    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id) && self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
    }

    pub fn allows_type(&self, kind: &str) -> bool {
        !self.not_types.iter().any(|t| type_matches(t, kind))
            && self.types.as_ref().is_none_or(|types| types.iter().any(|t| type_matches(t, kind)))
    }

    pub fn allows(&self, pdu: &Pdu) -> bool {
        if !self.allows_type(&pdu.kind.to_string()) {
            return false;
        }
        let sender = pdu.sender.as_str();
        if self.not_senders.iter().any(|s| s == sender) {
            return false;
        }
        if let Some(senders) = &self.senders
            && !senders.iter().any(|s| s == sender)
        {
            return false;
        }
        if let Some(contains_url) = self.contains_url {
            let has_url = pdu.content_json().get("url").is_some();
            if has_url != contains_url {
                return false;
            }
        }
        self.allows_room(pdu.room_id.as_str())
    }
}


/// The spec's RoomFilter.
#[derive(Default, Clone, Debug)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub include_leave: bool,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub account_data: EventFilter,
}

impl RoomFilter {
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room_id) && self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
    }

    pub fn ephemeral_allows(&self, kind: &str) -> bool {
        self.ephemeral.allows_type(kind)
    }

    pub fn account_data_allows(&self, kind: &str) -> bool {
        self.account_data.allows_type(kind)
    }
}

/// The spec's Filter for /sync.
#[derive(Clone, Debug)]
pub struct SyncFilter {
    pub room: RoomFilter,
    pub account_data: EventFilter,
    pub presence_enabled: bool,
}

impl SyncFilter {
    pub fn from_json(value: Option<&JsonValue>, presence_enabled: bool) -> Self {
        let room = value.and_then(|v| v.get("room"));
        let presence = EventFilter::from_json(value.and_then(|v| v.get("presence")));
        Self {
            room: RoomFilter {
                rooms: strings(room.and_then(|r| r.get("rooms"))),
                not_rooms: strings(room.and_then(|r| r.get("not_rooms"))).unwrap_or_default(),
                include_leave: room.and_then(|r| r.get("include_leave")).and_then(JsonValue::as_bool).unwrap_or(false),
                timeline: EventFilter::from_json(room.and_then(|r| r.get("timeline"))),
                state: EventFilter::from_json(room.and_then(|r| r.get("state"))),
                ephemeral: EventFilter::from_json(room.and_then(|r| r.get("ephemeral"))),
                account_data: EventFilter::from_json(room.and_then(|r| r.get("account_data"))),
            },
            account_data: EventFilter::from_json(value.and_then(|v| v.get("account_data"))),
            presence_enabled: presence_enabled && presence.allows_type("m.presence") && presence.limit != Some(0),
        }
    }

    pub fn account_data_allows(&self, kind: &str) -> bool {
        self.account_data.allows_type(kind)
    }
}

/// Tokens (sync and pagination alike) are stream positions: "after every event at or before
/// this position".
pub fn token(pos: StreamPos) -> String {
    format!("s{pos}")
}

pub fn parse_token(token: &str) -> Result<StreamPos> {
    token
        .strip_prefix('s')
        .or_else(|| token.strip_prefix('t'))
        .unwrap_or(token)
        .parse()
        .map_err(|_| Error::invalid_param(format!("invalid token {token:?}")))
}

/// A pagination token anywhere in a room's history: a stream token for a timeline event, or
/// `b<position>_<order>` inside history backfilled before one.
pub fn history_token((pos, order): crate::rooms::HistoryKey) -> String {
    if order == crate::rooms::TIMELINE_ORDER { token(pos) } else { format!("b{pos}_{order}") }
}

pub fn parse_history_token(token: &str) -> Result<crate::rooms::HistoryKey> {
    match token.strip_prefix('b').and_then(|rest| rest.split_once('_')) {
        Some((pos, order)) => match (pos.parse(), order.parse()) {
            (Ok(pos), Ok(order)) => Ok((pos, order)),
            _ => Err(Error::invalid_param(format!("invalid token {token:?}"))),
        },
        None => Ok((parse_token(token)?, crate::rooms::TIMELINE_ORDER)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_and_room_rules() {
        let filter = EventFilter::from_json(Some(&json!({
            "types": ["m.room.*"], "not_types": ["m.room.member"], "not_senders": ["@spam:x"]
        })));
        assert!(filter.allows_type("m.room.message"));
        assert!(!filter.allows_type("m.room.member"));
        assert!(!filter.allows_type("m.typing"));
        let sync = SyncFilter::from_json(Some(&json!({
            "room": { "not_rooms": ["!a:x"], "include_leave": true },
            "presence": { "not_types": ["*"] }
        })), true);
        assert!(!sync.room.allows_room("!a:x"));
        assert!(sync.room.allows_room("!b:x"));
        assert!(sync.room.include_leave);
        assert!(!sync.presence_enabled);
    }

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        assert_eq!(parse_token(&token(42)).unwrap(), 42);
        assert_eq!(parse_token("t7").unwrap(), 7);
        assert!(parse_token("s-1").is_err());
        assert!(parse_token("nope").is_err());
    }
}
