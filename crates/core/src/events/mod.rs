//! PDUs: building, canonical JSON, content hashes, signatures, event ids, redaction and the
//! client event format, all through ruma's implementations of the room version rules.

mod signing_key;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId,
    OwnedUserId, RoomId, RoomVersionId, UInt, UserId,
    canonical_json::{RedactedBecause, redact_in_place, to_canonical_value},
    events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value as JsonValue, value::RawValue as RawJsonValue};

pub use signing_key::ServerSigningKey;

use crate::error::{Error, ErrorCode, Result};

/// The room versions Limbic creates and joins.
pub const SUPPORTED_ROOM_VERSIONS: &[RoomVersionId] = &[RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];
pub const DEFAULT_ROOM_VERSION: RoomVersionId = RoomVersionId::V11;

pub fn rules_for(version: &RoomVersionId) -> Result<RoomVersionRules> {
    if !SUPPORTED_ROOM_VERSIONS.contains(version) {
        return Err(Error::new(
            ErrorCode::UnsupportedRoomVersion,
            format!("room version {version} is not supported"),
        ));
    }
    version.rules().ok_or_else(|| Error::internal("missing rules for a supported room version"))
}

/// A persisted event: the fields the server reasons about. The full canonical JSON (with
/// hashes, signatures and any unknown keys) is what the store keeps.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: UInt,
    /// Top-level in v10; for v11 it is copied here from `content.redacts` on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacts: Option<OwnedEventId>,
    /// A v12 `m.room.create` has no `room_id`: the room id is its own event id, filled in on
    /// load, and the event must not claim one to the auth rules.
    #[serde(skip)]
    pub room_id_implied: bool,
}

#[derive(Deserialize)]
struct RedactsContent {
    redacts: Option<OwnedEventId>,
}

/// A user's membership of a room, as `m.room.member` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Join,
    Invite,
    Knock,
    Leave,
    Ban,
}

impl Membership {
    /// The `membership` of an `m.room.member` content.
    pub fn of(content: &JsonValue) -> Option<Self> {
        content.get("membership").and_then(JsonValue::as_str).and_then(Self::parse)
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "join" => Self::Join,
            "invite" => Self::Invite,
            "knock" => Self::Knock,
            "leave" => Self::Leave,
            "ban" => Self::Ban,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Invite => "invite",
            Self::Knock => "knock",
            Self::Leave => "leave",
            Self::Ban => "ban",
        }
    }
}

impl Pdu {
    /// Parses a stored canonical PDU (which carries `event_id`).
    pub fn from_stored(bytes: &[u8]) -> Result<Self> {
        let corrupt = |e: serde_json::Error| Error::internal(format!("corrupt stored PDU: {e}"));
        // Only a v12 create event lacks a room id; anything else that fails is corrupt.
        let mut pdu: Pdu = match serde_json::from_slice(bytes) {
            Ok(pdu) => pdu,
            Err(error) => Self::with_implied_room_id(bytes).map_err(|_| corrupt(error))?,
        };
        if pdu.redacts.is_none() && pdu.kind == TimelineEventType::RoomRedaction {
            pdu.redacts = serde_json::from_str::<RedactsContent>(pdu.content.get())
                .ok()
                .and_then(|c| c.redacts);
        }
        Ok(pdu)
    }

    /// A v12 create event: its room id is `!` and its reference hash (its event id's).
    fn with_implied_room_id(bytes: &[u8]) -> Result<Self> {
        let corrupt = |e: String| Error::internal(format!("corrupt stored PDU: {e}"));
        let mut object: serde_json::Map<String, JsonValue> = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if object.get("type").and_then(JsonValue::as_str) != Some("m.room.create") {
            return Err(corrupt("an event without a room_id".into()));
        }
        let event_id = object.get("event_id").and_then(JsonValue::as_str).ok_or_else(|| corrupt("no event_id".into()))?;
        let room_id = RoomId::new_v2(event_id.trim_start_matches('$')).map_err(|e| corrupt(e.to_string()))?;
        object.insert("room_id".into(), JsonValue::String(room_id.to_string()));
        let mut pdu: Pdu = serde_json::from_value(JsonValue::Object(object)).map_err(|e| corrupt(e.to_string()))?;
        pdu.room_id_implied = true;
        Ok(pdu)
    }

    pub fn content_json(&self) -> JsonValue {
        serde_json::from_str(self.content.get()).unwrap_or(JsonValue::Null)
    }

    pub fn is_state(&self) -> bool {
        self.state_key.is_some()
    }

    /// The membership an `m.room.member` event sets (`None` for other events, and for an
    /// unknown membership).
    pub fn membership(&self) -> Option<Membership> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        Membership::of(&self.content_json())
    }

    /// The event in the client-server format, with the `unsigned` the caller computed.
    pub fn to_client_event(&self, unsigned: Option<JsonValue>, with_room_id: bool) -> JsonValue {
        let mut event = serde_json::Map::new();
        event.insert("type".into(), JsonValue::String(self.kind.to_string()));
        event.insert("content".into(), self.content_json());
        event.insert("event_id".into(), JsonValue::String(self.event_id.to_string()));
        event.insert("sender".into(), JsonValue::String(self.sender.to_string()));
        event.insert("origin_server_ts".into(), JsonValue::from(u64::from(self.origin_server_ts.0)));
        if with_room_id {
            event.insert("room_id".into(), JsonValue::String(self.room_id.to_string()));
        }
        if let Some(state_key) = &self.state_key {
            event.insert("state_key".into(), JsonValue::String(state_key.clone()));
        }
        if let Some(redacts) = &self.redacts {
            event.insert("redacts".into(), JsonValue::String(redacts.to_string()));
        }
        if let Some(unsigned) = unsigned.filter(|u| u.as_object().is_some_and(|o| !o.is_empty())) {
            event.insert("unsigned".into(), unsigned);
        }
        JsonValue::Object(event)
    }

    /// The stripped form used for invite and knock state.
    pub fn to_stripped_state(&self) -> JsonValue {
        serde_json::json!({
            "type": self.kind.to_string(),
            "state_key": self.state_key.clone().unwrap_or_default(),
            "sender": self.sender,
            "content": self.content_json(),
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        (!self.room_id_implied).then_some(&*self.room_id)
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawJsonValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        false
    }
}

/// What a local sender wants to send; the room fills in the rest.
#[derive(Debug, Clone)]
pub struct PduBuilder {
    pub kind: TimelineEventType,
    pub content: JsonValue,
    pub state_key: Option<String>,
    /// The event a v10 redaction redacts (v11 carries it in the content).
    pub redacts: Option<OwnedEventId>,
    pub timestamp: Option<MilliSecondsSinceUnixEpoch>,
}

impl PduBuilder {
    pub fn state(kind: impl Into<TimelineEventType>, state_key: impl Into<String>, content: JsonValue) -> Self {
        Self {
            kind: kind.into(),
            content,
            state_key: Some(state_key.into()),
            redacts: None,
            timestamp: None,
        }
    }

    pub fn message(kind: impl Into<TimelineEventType>, content: JsonValue) -> Self {
        Self { kind: kind.into(), content, state_key: None, redacts: None, timestamp: None }
    }
}

/// The room-dependent fields of a new event, chosen by the room under its write lock.
pub struct PduPlacement<'a> {
    pub room_id: &'a RoomId,
    pub sender: &'a UserId,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub depth: u64,
    pub rules: &'a RoomVersionRules,
}

/// An event with its hashes and id, ready for authorization and storage: signed by its origin,
/// or, built here by [`build_unsigned_pdu`], to be signed when it first leaves the server
/// ([`sign_local_pdu`]).
#[derive(Clone)]
pub struct SignedPdu {
    pub pdu: Pdu,
    /// The canonical JSON as stored (including `event_id`).
    pub canonical: CanonicalJsonObject,
}

impl SignedPdu {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.canonical).expect("canonical JSON always serializes")
    }
}

/// Builds the full PDU, signed by `key`'s server: content hash, signature, and the
/// reference-hash event id.
pub fn build_pdu(
    builder: PduBuilder,
    placement: PduPlacement<'_>,
    key: &ServerSigningKey,
) -> Result<SignedPdu> {
    assemble(builder, placement, Some(key))
}

/// Builds a local event unsigned: its content hash and reference-hash event id. This server
/// signs it ([`sign_local_pdu`]) when it first sends it to another: neither the id nor the
/// hashes depend on the signature, and most of a clinic's events never leave the server, so
/// the signature (an ed25519 signing of the redacted event, a third of the CPU of building an
/// event) is not made under the room's lock.
pub fn build_unsigned_pdu(builder: PduBuilder, placement: PduPlacement<'_>) -> Result<SignedPdu> {
    assemble(builder, placement, None)
}

/// Signs an event this server built unsigned, as other servers get it (without `event_id`).
pub fn sign_local_pdu(object: &mut CanonicalJsonObject, key: &ServerSigningKey, rules: &RoomVersionRules) -> Result<()> {
    ruma::signatures::sign_event(key.server_name().as_str(), key.key_pair(), object, &rules.redaction).map_err(|e| Error::internal(format!("signing failed: {e}")))
}

fn assemble(builder: PduBuilder, placement: PduPlacement<'_>, key: Option<&ServerSigningKey>) -> Result<SignedPdu> {
    let mut object = CanonicalJsonObject::new();
    let content = to_canonical_value(&builder.content)
        .map_err(|e| Error::bad_json(format!("content is not canonical JSON: {e}")))?;
    if !matches!(content, CanonicalJsonValue::Object(_)) {
        return Err(Error::bad_json("event content must be a JSON object"));
    }
    let ts = builder.timestamp.unwrap_or_else(MilliSecondsSinceUnixEpoch::now);
    let event_ids = |ids: &[OwnedEventId]| {
        CanonicalJsonValue::Array(ids.iter().map(|id| CanonicalJsonValue::String(id.to_string())).collect())
    };
    object.insert("type".into(), CanonicalJsonValue::String(builder.kind.to_string()));
    object.insert("content".into(), content);
    if builder.kind != TimelineEventType::RoomCreate || placement.rules.event_format.require_room_create_room_id {
        object.insert("room_id".into(), CanonicalJsonValue::String(placement.room_id.to_string()));
    }
    object.insert("sender".into(), CanonicalJsonValue::String(placement.sender.to_string()));
    object.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ts.0.into()));
    object.insert("depth".into(), CanonicalJsonValue::Integer(placement.depth.try_into().map_err(|_| Error::internal("depth overflow"))?));
    object.insert("prev_events".into(), event_ids(&placement.prev_events));
    object.insert("auth_events".into(), event_ids(&placement.auth_events));
    if let Some(state_key) = builder.state_key {
        object.insert("state_key".into(), CanonicalJsonValue::String(state_key));
    }
    if let Some(redacts) = builder.redacts {
        object.insert("redacts".into(), CanonicalJsonValue::String(redacts.to_string()));
    }

    let too_large = |e: ruma::signatures::JsonError| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::new(ErrorCode::TooLarge, "event is larger than 65536 bytes"),
        other => Error::internal(format!("hashing or signing failed: {other}")),
    };
    ruma::signatures::add_content_hash_to_event(&mut object).map_err(too_large)?;
    if let Some(key) = key {
        ruma::signatures::sign_event(key.server_name().as_str(), key.key_pair(), &mut object, &placement.rules.redaction).map_err(too_large)?;
    }
    let hash = ruma::signatures::reference_hash(&object, placement.rules)
        .map_err(|_| Error::new(ErrorCode::TooLarge, "event is larger than 65536 bytes"))?;
    let event_id: OwnedEventId = format!("${hash}")
        .try_into()
        .map_err(|e| Error::internal(format!("bad event id: {e}")))?;
    object.insert("event_id".into(), CanonicalJsonValue::String(event_id.to_string()));

    let bytes = serde_json::to_vec(&object).expect("canonical JSON always serializes");
    let pdu = Pdu::from_stored(&bytes)?;
    Ok(SignedPdu { pdu, canonical: object })
}

/// Redacts a stored PDU (its canonical JSON, with `event_id`) under the room's rules.
pub fn redact_stored(
    stored: &[u8],
    rules: &RoomVersionRules,
    redaction: &Pdu,
) -> Result<Vec<u8>> {
    let mut object: CanonicalJsonObject = serde_json::from_slice(stored)
        .map_err(|e| Error::internal(format!("corrupt stored PDU: {e}")))?;
    let because = RedactedBecause::from_json(
        serde_json::from_value(redaction.to_client_event(None, true))
            .map_err(|e| Error::internal(format!("redaction event: {e}")))?,
    );
    let event_id = object.remove("event_id");
    redact_in_place(&mut object, &rules.redaction, Some(because))
        .map_err(|e| Error::internal(format!("redaction failed: {e}")))?;
    // The redacted_because lives in unsigned; keep the stored PDU free of it.
    object.remove("unsigned");
    if let Some(event_id) = event_id {
        object.insert("event_id".into(), event_id);
    }
    Ok(serde_json::to_vec(&object).expect("canonical JSON always serializes"))
}

/// The users with unlimited power in a room: since v12, the create event's sender and its
/// `additional_creators`; before, nobody (the creator's power is in `m.room.power_levels`).
pub fn privileged_creators(create: &Pdu, rules: &RoomVersionRules) -> Vec<OwnedUserId> {
    if !rules.authorization.explicitly_privilege_room_creators {
        return Vec::new();
    }
    let additional = create.content_json().get("additional_creators").and_then(JsonValue::as_array).cloned().unwrap_or_default();
    std::iter::once(create.sender.clone())
        .chain(additional.iter().filter_map(|user| user.as_str().and_then(|u| OwnedUserId::try_from(u).ok())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_room_id, owned_user_id, server_name};

    fn key() -> ServerSigningKey {
        ServerSigningKey::generate(server_name!("test.local").to_owned())
    }

    #[test]
    fn a_version_12_create_event_is_the_room_id_and_names_no_room() {
        let key = key();
        let rules = rules_for(&RoomVersionId::V12).unwrap();
        let unused = owned_room_id!("!unused:test.local");
        let sender = owned_user_id!("@a:test.local");
        let content = serde_json::json!({ "room_version": "12", "additional_creators": ["@b:test.local", 7] });
        let placement = || PduPlacement { room_id: &unused, sender: &sender, prev_events: vec![], auth_events: vec![], depth: 1, rules: &rules };
        let signed = build_pdu(PduBuilder::state("m.room.create", "", content), placement(), &key).unwrap();
        // On the wire it has no room_id; in memory the room id is `!` and the event id's hash.
        assert!(!signed.canonical.contains_key("room_id"));
        assert_eq!(signed.pdu.room_id.strip_sigil(), &signed.pdu.event_id.as_str()[1..]);
        assert!(ruma::state_res::Event::room_id(&signed.pdu).is_none());
        let mut wire = signed.canonical.clone();
        wire.remove("event_id");
        ruma::state_res::check_pdu_format(&wire, &rules.event_format).unwrap();
        // Loading it back gives the same room id; its creators are the sender and the valid extra.
        let loaded = Pdu::from_stored(&signed.to_bytes()).unwrap();
        assert_eq!(loaded.room_id, signed.pdu.room_id);
        assert_eq!(privileged_creators(&loaded, &rules), vec![sender.clone(), owned_user_id!("@b:test.local")]);
        assert!(privileged_creators(&loaded, &rules_for(&RoomVersionId::V11).unwrap()).is_empty());
        // Any other event still needs a room_id.
        let message = build_pdu(PduBuilder::message("m.room.message", serde_json::json!({})), placement(), &key).unwrap();
        assert_eq!(message.pdu.room_id, unused);
        let mut without = message.canonical.clone();
        without.remove("room_id");
        assert!(Pdu::from_stored(&serde_json::to_vec(&without).unwrap()).is_err());
    }

    #[test]
    fn built_pdus_verify_and_redact() {
        let key = key();
        let rules = rules_for(&RoomVersionId::V11).unwrap();
        let room_id = owned_room_id!("!r:test.local");
        let sender = owned_user_id!("@a:test.local");
        let signed = build_pdu(
            PduBuilder::message("m.room.message", serde_json::json!({"body": "hi", "msgtype": "m.text"})),
            PduPlacement {
                room_id: &room_id,
                sender: &sender,
                prev_events: vec![],
                auth_events: vec![],
                depth: 3,
                rules: &rules,
            },
            &key,
        )
        .unwrap();
        assert!(signed.pdu.event_id.as_str().starts_with('$'));
        assert_eq!(signed.pdu.depth, UInt::from(3u32));

        // The signature and content hash check out with ruma's verifier.
        let mut object = signed.canonical.clone();
        object.remove("event_id");
        let mut keys = ruma::signatures::PublicKeyMap::new();
        keys.insert("test.local".into(), key.public_key_set());
        let verified = ruma::signatures::verify_event(&keys, &object, &rules).unwrap();
        assert_eq!(verified, ruma::signatures::Verified::All);

        // Redaction keeps the id and strips the content.
        let redactor = signed.pdu.clone();
        let redacted = redact_stored(&signed.to_bytes(), &rules, &redactor).unwrap();
        let pdu = Pdu::from_stored(&redacted).unwrap();
        assert_eq!(pdu.event_id, signed.pdu.event_id);
        assert_eq!(pdu.content.get(), "{}");
    }

    /// A local event built unsigned has the id and hashes of the same event built signed; signed
    /// later, it is that event, and verifies; redacted first, it gets the original's signature.
    #[test]
    fn a_local_event_built_unsigned_is_signed_later_as_if_at_once() {
        use ruma::signatures::{PublicKeyMap, Verified, verify_event};
        let key = key();
        let rules = rules_for(&RoomVersionId::V11).unwrap();
        let (room_id, sender) = (owned_room_id!("!r:test.local"), owned_user_id!("@a:test.local"));
        let mut builder = PduBuilder::message("m.room.message", serde_json::json!({ "body": "hi", "msgtype": "m.text" }));
        builder.timestamp = Some(MilliSecondsSinceUnixEpoch(UInt::from(7u32)));
        let placement = || PduPlacement { room_id: &room_id, sender: &sender, prev_events: vec![], auth_events: vec![], depth: 3, rules: &rules };
        let unsigned = build_unsigned_pdu(builder.clone(), placement()).unwrap();
        let signed = build_pdu(builder, placement(), &key).unwrap();
        assert_eq!(unsigned.pdu.event_id, signed.pdu.event_id);
        assert!(!unsigned.canonical.contains_key("signatures"));
        assert_eq!(unsigned.canonical.get("hashes"), signed.canonical.get("hashes"));
        let wire = |stored: &[u8]| {
            let mut object: CanonicalJsonObject = serde_json::from_slice(stored).unwrap();
            object.remove("event_id");
            object
        };
        let mut later = wire(&unsigned.to_bytes());
        sign_local_pdu(&mut later, &key, &rules).unwrap();
        assert_eq!(later, wire(&signed.to_bytes()));
        let mut keys = PublicKeyMap::new();
        keys.insert("test.local".into(), key.public_key_set());
        assert_eq!(verify_event(&keys, &later, &rules).unwrap(), Verified::All);
        let mut redacted = wire(&redact_stored(&unsigned.to_bytes(), &rules, &unsigned.pdu).unwrap());
        sign_local_pdu(&mut redacted, &key, &rules).unwrap();
        assert_eq!(redacted.get("signatures"), later.get("signatures"));
        assert_eq!(verify_event(&keys, &redacted, &rules).unwrap(), Verified::Signatures);
    }

    #[test]
    fn floats_and_non_objects_are_refused() {
        let key = key();
        let rules = rules_for(&RoomVersionId::V11).unwrap();
        let room_id = owned_room_id!("!r:test.local");
        let sender = owned_user_id!("@a:test.local");
        for content in [serde_json::json!({"x": 1.5}), serde_json::json!([1])] {
            let err = build_pdu(
                PduBuilder::message("m.room.message", content),
                PduPlacement {
                    room_id: &room_id,
                    sender: &sender,
                    prev_events: vec![],
                    auth_events: vec![],
                    depth: 1,
                    rules: &rules,
                },
                &key,
            )
            .err()
            .unwrap();
            assert_eq!(err.code(), ErrorCode::BadJson);
        }
        assert!(rules_for(&RoomVersionId::V1).is_err());
    }
}
