//! Signing keys across servers: our own key server response (with the keys we rotated out),
//! other servers' keys fetched, verified and cached until their `valid_until_ts`, and the notary
//! answers we give for them.

use limbic_core::now_ms;
use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedServerName, ServerName,
    serde::Base64,
    signatures::{PublicKeyMap, PublicKeySet},
};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::FederationError;
use crate::store::{Store, tables};

/// How long our own key server response says it is valid.
const OWN_VALIDITY_MS: u64 = 24 * 3600 * 1000;
/// Room versions 5 and later cap a response's validity at a week from when it was fetched.
const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;


/// One key of another server: valid until a time, or expired at one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CachedKey {
    pub key: String,
    /// For current keys: until when the server vouched for them.
    pub valid_until_ts: u64,
    /// For old keys: when they stopped being used.
    pub expired_ts: Option<u64>,
}

/// What we keep per server: its keys, and its last key server response as it signed it (for
/// notary answers).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerKeys {
    pub keys: BTreeMap<String, CachedKey>,
    pub response: Option<JsonValue>,
}

impl ServerKeys {
    /// The keys usable for something signed at `ts` (ms): current keys still vouched for then,
    /// old keys that had not yet expired then.
    pub fn usable_at(&self, ts: u64) -> PublicKeySet {
        self.keys
            .iter()
            .filter(|(_, key)| match key.expired_ts {
                Some(expired) => ts <= expired,
                None => ts <= key.valid_until_ts,
            })
            .filter_map(|(id, key)| Some((id.clone(), Base64::parse(&key.key).ok()?)))
            .collect()
    }
}

/// Checks a key server response (`/_matrix/key/v2/server` of `server`, directly or through a
/// notary) and extracts its keys: the right server, signed by itself with one of the keys it
/// lists, validity capped at a week from `fetched_at`.
pub fn verify_response(server: &ServerName, response: &JsonValue, fetched_at: u64) -> Result<ServerKeys, FederationError> {
    let invalid = |reason: &str| FederationError::Keys(format!("{server}: {reason}"));
    if response.get("server_name").and_then(JsonValue::as_str) != Some(server.as_str()) {
        return Err(invalid("the response is for another server"));
    }
    let valid_until = response.get("valid_until_ts").and_then(JsonValue::as_u64).ok_or_else(|| invalid("no valid_until_ts"))?;
    let valid_until = valid_until.min(fetched_at + MAX_VALIDITY_MS);
    let mut keys = BTreeMap::new();
    let mut verify_keys = PublicKeySet::new();
    for (id, entry) in response.get("verify_keys").and_then(JsonValue::as_object).into_iter().flatten() {
        let key = entry.get("key").and_then(JsonValue::as_str).ok_or_else(|| invalid("a verify key without `key`"))?;
        verify_keys.insert(id.clone(), Base64::parse(key).map_err(|_| invalid("a verify key that is not base64"))?);
        keys.insert(id.clone(), CachedKey { key: key.to_owned(), valid_until_ts: valid_until, expired_ts: None });
    }
    if verify_keys.is_empty() {
        return Err(invalid("no verify keys"));
    }
    for (id, entry) in response.get("old_verify_keys").and_then(JsonValue::as_object).into_iter().flatten() {
        let (Some(key), Some(expired)) = (entry.get("key").and_then(JsonValue::as_str), entry.get("expired_ts").and_then(JsonValue::as_u64)) else {
            return Err(invalid("an old verify key without `key` or `expired_ts`"));
        };
        keys.insert(id.clone(), CachedKey { key: key.to_owned(), valid_until_ts: expired, expired_ts: Some(expired) });
    }
    let object: CanonicalJsonObject = serde_json::from_value(response.clone()).map_err(|e| invalid(&format!("not canonical JSON: {e}")))?;
    // Only the server's own signature counts here (a notary adds its own beside it).
    let mut own_signature_only = object.clone();
    if let Some(CanonicalJsonValue::Object(signatures)) = own_signature_only.get_mut("signatures") {
        signatures.retain(|signer, _| signer == server.as_str());
    }
    let map: PublicKeyMap = BTreeMap::from([(server.to_string(), verify_keys)]);
    ruma::signatures::verify_json(&map, &own_signature_only).map_err(|e| invalid(&format!("bad self-signature: {e}")))?;
    Ok(ServerKeys { keys, response: Some(response.clone()) })
}

/// The key cache in the store.
pub struct KeyCache<'a> {
    pub store: &'a Store,
}

impl KeyCache<'_> {
    pub fn get(&self, server: &ServerName) -> Result<ServerKeys, FederationError> {
        Ok(self.store.get_json(tables::SERVER_KEYS, server.as_bytes())?.unwrap_or_default())
    }

    /// Merges newly fetched keys into the cache: keys we knew and the response no longer lists
    /// stay (signatures made with them stay checkable).
    pub fn merge(&self, server: &ServerName, fetched: ServerKeys) -> Result<ServerKeys, FederationError> {
        let mut cached = self.get(server)?;
        for (id, key) in fetched.keys {
            cached.keys.insert(id, key);
        }
        cached.response = fetched.response.or(cached.response);
        let mut batch = self.store.batch();
        batch.put_json(tables::SERVER_KEYS, server.as_bytes(), &cached)?;
        self.store.write(batch)?;
        Ok(cached)
    }
}

/// Our own key server response, signed: the current key, valid for a day, and the keys we
/// rotated out, with when.
pub fn own_response(key: &crate::events::ServerSigningKey, old_keys: &[(String, String, u64)]) -> Result<CanonicalJsonObject, FederationError> {
    let server: &OwnedServerName = key.server_name();
    let verify_keys: serde_json::Map<String, JsonValue> =
        key.public_key_set().into_iter().map(|(id, public)| (id, serde_json::json!({ "key": public.encode() }))).collect();
    let old: serde_json::Map<String, JsonValue> =
        old_keys.iter().map(|(id, public, expired)| (id.clone(), serde_json::json!({ "key": public, "expired_ts": expired }))).collect();
    let response = serde_json::json!({
        "server_name": server,
        "valid_until_ts": now_ms() + OWN_VALIDITY_MS,
        "verify_keys": verify_keys,
        "old_verify_keys": old,
    });
    let mut object: CanonicalJsonObject = serde_json::from_value(response).map_err(|e| FederationError::Keys(e.to_string()))?;
    ruma::signatures::sign_json(server.as_str(), key.key_pair(), &mut object).map_err(|e| FederationError::Keys(e.to_string()))?;
    Ok(object)
}

/// Adds our signature to another server's key response, as a notary does.
pub fn notarize(key: &crate::events::ServerSigningKey, response: &JsonValue) -> Result<JsonValue, FederationError> {
    let mut object: CanonicalJsonObject = serde_json::from_value(response.clone()).map_err(|e| FederationError::Keys(e.to_string()))?;
    ruma::signatures::sign_json(key.server_name().as_str(), key.key_pair(), &mut object).map_err(|e| FederationError::Keys(e.to_string()))?;
    serde_json::to_value(object).map_err(|e| FederationError::Keys(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ServerSigningKey;

    fn key(name: &str) -> ServerSigningKey {
        ServerSigningKey::generate(OwnedServerName::try_from(name).unwrap())
    }

    #[test]
    fn own_responses_verify_and_keep_old_keys_usable_until_they_expired() {
        let ours = key("a.test");
        let response = serde_json::to_value(own_response(&ours, &[("ed25519:old".into(), "b2xka2V5b2xka2V5b2xka2V5b2xka2V5b2xka2V5b2s".into(), 1000)]).unwrap()).unwrap();
        let now = now_ms();
        let keys = verify_response(ours.server_name(), &response, now).unwrap();
        assert!(keys.usable_at(now).contains_key(&ours.key_id()));
        assert!(keys.usable_at(999).contains_key("ed25519:old"));
        assert!(!keys.usable_at(now).contains_key("ed25519:old"));
        // A notary's signature beside the server's does not disturb the check.
        let notarized = notarize(&key("notary.test"), &response).unwrap();
        assert!(verify_response(ours.server_name(), &notarized, now).is_ok());
    }

    #[test]
    fn forged_or_misdirected_responses_are_refused() {
        let ours = key("a.test");
        let mut response = serde_json::to_value(own_response(&ours, &[]).unwrap()).unwrap();
        let now = now_ms();
        let other = OwnedServerName::try_from("b.test").unwrap();
        assert!(verify_response(&other, &response, now).is_err());
        response["valid_until_ts"] = serde_json::json!(now + 1);
        assert!(matches!(verify_response(ours.server_name(), &response, now), Err(FederationError::Keys(m)) if m.contains("self-signature")));
    }

    #[test]
    fn validity_is_capped_at_a_week() {
        let ours = key("a.test");
        let mut object = own_response(&ours, &[]).unwrap();
        object.insert("valid_until_ts".into(), CanonicalJsonValue::Integer(ruma::Int::MAX));
        object.remove("signatures");
        ruma::signatures::sign_json("a.test", ours.key_pair(), &mut object).unwrap();
        let keys = verify_response(ours.server_name(), &serde_json::to_value(object).unwrap(), 1000).unwrap();
        assert_eq!(keys.keys[&ours.key_id()].valid_until_ts, 1000 + MAX_VALIDITY_MS);
    }
}
