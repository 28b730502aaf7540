//! A PDU another server signed: parsed, its event id computed, its signatures and content hash
//! checked; and the auth chains and raw events this server hands out.

use std::collections::HashSet;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName,
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, Verified},
};
use serde_json::{Value as JsonValue, value::RawValue};

use super::Federation;
use super::FederationHost;
use crate::{
    error::{Error, Result},
    events::{Pdu, SignedPdu},
};

/// The reference-hash event id of a PDU.
pub(super) fn event_id_of(object: &CanonicalJsonObject, rules: &RoomVersionRules) -> Result<OwnedEventId> {
    let hash = ruma::signatures::reference_hash(object, rules).map_err(|e| Error::bad_json(format!("cannot hash the event: {e}")))?;
    OwnedEventId::try_from(format!("${hash}")).map_err(|e| Error::bad_json(e.to_string()))
}

/// Checks a PDU another server signed: every signature against the signer's keys as of the
/// event's time; a content hash that does not match means the event is kept redacted.
pub async fn verify_pdu(federation: &Federation, raw: &RawValue, rules: &RoomVersionRules) -> Result<SignedPdu> {
    let unchecked = UncheckedPdu::parse(raw, rules)?;
    let mut keys = PublicKeyMap::new();
    for (server, key_ids) in unchecked.signers() {
        keys.insert(server.to_string(), federation.public_keys(&server, &key_ids, unchecked.ts).await?);
    }
    unchecked.verify(&keys, rules)
}

/// A PDU read from another server, in canonical JSON and with its reference-hash event id,
/// whose signatures are not checked yet. Parsing and checking are apart from the key look-ups
/// between them (and fuzzed: `crate::fuzz`).
pub struct UncheckedPdu {
    object: CanonicalJsonObject,
    event_id: OwnedEventId,
    /// When it was sent: the signers' keys must have been valid then.
    ts: u64,
}

impl UncheckedPdu {
    pub fn parse(raw: &RawValue, rules: &RoomVersionRules) -> Result<Self> {
        let mut object: CanonicalJsonObject = serde_json::from_str(raw.get()).map_err(|e| Error::bad_json(format!("not a PDU: {e}")))?;
        object.remove("event_id");
        ruma::state_res::check_pdu_format(&object, &rules.event_format).map_err(|e| Error::bad_json(format!("malformed PDU: {e}")))?;
        let event_id = event_id_of(&object, rules)?;
        let ts = match object.get("origin_server_ts") {
            Some(CanonicalJsonValue::Integer(ts)) => u64::try_from(i64::from(*ts)).unwrap_or(0),
            _ => return Err(Error::bad_json("a PDU needs origin_server_ts")),
        };
        Ok(Self { object, event_id, ts })
    }

    /// The servers that signed it, with the ids of the keys they signed with.
    pub fn signers(&self) -> Vec<(OwnedServerName, Vec<String>)> {
        let Some(CanonicalJsonValue::Object(signatures)) = self.object.get("signatures") else { return Vec::new() };
        signatures
            .iter()
            .filter_map(|(server, by_key)| match (OwnedServerName::try_from(server.as_str()), by_key) {
                (Ok(server), CanonicalJsonValue::Object(by_key)) => Some((server, by_key.keys().cloned().collect())),
                _ => None,
            })
            .collect()
    }

    /// Checks the signatures against `keys` (the signers' keys as of the event's time).
    pub fn verify(self, keys: &PublicKeyMap, rules: &RoomVersionRules) -> Result<SignedPdu> {
        let Self { mut object, event_id, .. } = self;
        match ruma::signatures::verify_event(keys, &object, rules) {
            Ok(Verified::All) => {}
            Ok(Verified::Signatures) => {
                tracing::warn!(%event_id, "content hash mismatch: keeping the event redacted");
                object = ruma::canonical_json::redact(object, &rules.redaction, None).map_err(|e| Error::bad_json(e.to_string()))?;
            }
            Err(error) => return Err(Error::forbidden(format!("{event_id}: bad signatures: {error}"))),
        }
        object.insert("event_id".into(), CanonicalJsonValue::String(event_id.to_string()));
        let bytes = serde_json::to_vec(&object).map_err(Error::internal)?;
        let pdu = Pdu::from_stored(&bytes).map_err(|_| Error::bad_json(format!("{event_id} is not a valid PDU")))?;
        Ok(SignedPdu { pdu, canonical: object })
    }
}

/// The room a PDU of a transaction names, if it names a valid one.
pub fn room_id_of(raw: &RawValue) -> Option<OwnedRoomId> {
    serde_json::from_str::<JsonValue>(raw.get()).ok()?.get("room_id")?.as_str().and_then(|r| OwnedRoomId::try_from(r).ok())
}

/// The events an event's auth chain consists of, recursively.
pub(super) fn auth_chain(server: &dyn FederationHost, start: &[OwnedEventId]) -> Result<Vec<Pdu>> {
    let mut seen: HashSet<OwnedEventId> = HashSet::new();
    let mut todo: Vec<OwnedEventId> = start.to_vec();
    let mut chain = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(pdu) = server.rooms().pdu(&id)? {
            todo.extend(pdu.auth_events.iter().cloned());
            chain.push(pdu);
        }
    }
    Ok(chain)
}

pub(super) fn raw_events(server: &dyn FederationHost, events: impl IntoIterator<Item = OwnedEventId>) -> Result<Vec<Box<RawValue>>> {
    let mut raw = Vec::new();
    for id in events {
        if let Some(pdu) = server.rooms().federation_pdu(&id)? {
            raw.push(pdu);
        }
    }
    Ok(raw)
}
