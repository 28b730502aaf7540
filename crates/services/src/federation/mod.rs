//! Federation: other homeservers reach us over a TLS listener and authenticate with X-Matrix
//! signatures; we reach them through server discovery with certificates checked against the
//! right name, signing every request. Keys are fetched, verified and cached (`keys`).

pub mod acl;
pub mod history;
pub mod inbound;
pub mod keys;
mod listener;
pub mod membership;
pub mod pdu;
pub mod resolve;
pub mod sender;
mod transport;

use limbic_core::now_ms;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use ruma::{OwnedServerName, ServerName, signatures::PublicKeySet};
use serde_json::Value as JsonValue;

pub use listener::{Peer, serve_tls};
use resolve::Route;
pub use transport::Transport;

use crate::{config::FederationConfig, events::ServerSigningKey, host::LocalServer, store::Store};

/// What federation reaches of the server: with the rooms, users and device keys, the federation
/// client (when federation is on) and whether presence is shared.
pub trait FederationHost: LocalServer {
    fn federation(&self) -> Option<&Arc<Federation>>;
    fn presence_enabled(&self) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("keys: {0}")]
    Keys(String),
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: OwnedServerName, reason: String },
    #[error("{server} answered {status}: {body}")]
    Remote { server: OwnedServerName, status: u16, body: String },
    #[error("federation with {0} is not allowed by this server's config")]
    NotAllowed(OwnedServerName),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<FederationError> for crate::Error {
    fn from(error: FederationError) -> Self {
        use crate::error::ErrorCode;
        match error {
            FederationError::NotAllowed(server) => crate::Error::forbidden(format!("federation with {server} is not allowed")),
            FederationError::Remote { server, status, body } => {
                let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
                match serde_json::from_str::<JsonValue>(&body) {
                    // Pass the remote server's Matrix error through.
                    Ok(body) if body.get("errcode").is_some() => crate::Error::Detailed { status, body },
                    _ => crate::Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_GATEWAY, format!("{server} answered {status}")),
                }
            }
            FederationError::Store(error) => error.into(),
            other => crate::Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_GATEWAY, other.to_string()),
        }
    }
}

/// How long a discovered route is reused.
const ROUTE_TTL: Duration = Duration::from_secs(3600);

pub struct Federation {
    pub config: FederationConfig,
    key: Arc<ServerSigningKey>,
    store: Arc<Store>,
    transport: Transport,
    routes: Mutex<HashMap<OwnedServerName, (Route, Instant)>>,
    /// Events whose missing history was asked for while paginating (asked once per run).
    pub backfilled_before: Mutex<std::collections::HashSet<ruma::OwnedEventId>>,
}

impl Federation {
    pub fn new(config: FederationConfig, key: Arc<ServerSigningKey>, store: Arc<Store>) -> Result<Self, FederationError> {
        let transport = Transport::new(&config)?;
        Ok(Self { config, key, store, transport, routes: Mutex::new(HashMap::new()), backfilled_before: Mutex::default() })
    }

    pub fn server_name(&self) -> &ServerName {
        self.key.server_name()
    }

    /// Whether we talk to `server` at all (the config's allow and deny lists).
    pub fn allows(&self, server: &ServerName) -> bool {
        let host = resolve::Name::parse(server.as_str()).map_or_else(|| server.to_string(), |name| name.host);
        let matches = |pattern: &String| match pattern.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")) || host == suffix,
            None => pattern == server.as_str() || *pattern == host,
        };
        let config = &self.config;
        !config.deny_servers.iter().any(matches) && (config.allow_servers.is_empty() || config.allow_servers.iter().any(matches))
    }

    fn check_allowed(&self, server: &ServerName) -> Result<(), FederationError> {
        if server == self.server_name() || !self.allows(server) {
            return Err(FederationError::NotAllowed(server.to_owned()));
        }
        Ok(())
    }

    /// Where `server` is reached, from the cache or by discovery.
    async fn route(&self, server: &ServerName) -> Result<Route, FederationError> {
        if let Some((route, at)) = self.routes.lock().unwrap_or_else(PoisonError::into_inner).get(server)
            && at.elapsed() < ROUTE_TTL
        {
            return Ok(route.clone());
        }
        let route = self.transport.discover(server).await?;
        self.routes.lock().unwrap_or_else(PoisonError::into_inner).insert(server.to_owned(), (route.clone(), Instant::now()));
        Ok(route)
    }

    /// Sends a signed federation request and parses the answer.
    pub async fn send<T>(&self, destination: &ServerName, request: T) -> Result<T::IncomingResponse, FederationError>
    where
        T: ruma::api::OutgoingRequest<Authentication = ruma::api::federation::authentication::ServerSignatures> + std::fmt::Debug,
        T::PathBuilder: ruma::api::path_builder::PathBuilder<Input<'static> = ()>,
    {
        self.check_allowed(destination)?;
        let route = self.route(destination).await?;
        self.transport.send(&route, self.server_name(), destination, self.key.key_pair(), request).await
    }

    /// An unauthenticated GET of another server's federation API (`openid/userinfo`).
    pub async fn get_unsigned(&self, destination: &ServerName, path: &str) -> Result<JsonValue, FederationError> {
        self.check_allowed(destination)?;
        let route = self.route(destination).await?;
        self.transport.get_json(&route, destination, path).await
    }

    /// Our key server response, signed now.
    pub fn own_keys(&self) -> Result<ruma::CanonicalJsonObject, FederationError> {
        let old = crate::events::ServerSigningKey::old_keys(&self.store)?;
        keys::own_response(&self.key, &old)
    }

    /// The public keys of `server` usable for a signature made at `ts`, fetching them (from the
    /// server, else from the trusted notaries) when the cache has none of `key_ids`.
    pub async fn public_keys(&self, server: &ServerName, key_ids: &[String], ts: u64) -> Result<PublicKeySet, FederationError> {
        if server == self.server_name() {
            return Ok(self.key.public_key_set());
        }
        let cache = keys::KeyCache { store: &self.store };
        let cached = cache.get(server)?.usable_at(ts);
        if key_ids.iter().all(|id| cached.contains_key(id)) && !key_ids.is_empty() {
            return Ok(cached);
        }
        let fetched = match self.fetch_keys(server).await {
            Ok(fetched) => fetched,
            Err(direct) => {
                tracing::info!(%server, error = %direct, "asking the notaries for the server's keys");
                self.fetch_keys_from_notaries(server).await.map_err(|_| direct)?
            }
        };
        Ok(cache.merge(server, fetched)?.usable_at(ts))
    }

    async fn fetch_keys(&self, server: &ServerName) -> Result<keys::ServerKeys, FederationError> {
        self.check_allowed(server)?;
        let route = self.route(server).await?;
        let response = self.transport.get_json(&route, server, "/_matrix/key/v2/server").await?;
        keys::verify_response(server, &response, now_ms())
    }

    async fn fetch_keys_from_notaries(&self, server: &ServerName) -> Result<keys::ServerKeys, FederationError> {
        for notary in &self.config.trusted_key_servers {
            let attempt = async {
                self.check_allowed(notary)?;
                let route = self.route(notary).await?;
                let answer = self.transport.get_json(&route, notary, &format!("/_matrix/key/v2/query/{server}")).await?;
                let notary_keys = Box::pin(self.public_keys(notary, &[], now_ms())).await?;
                for response in answer.get("server_keys").and_then(JsonValue::as_array).into_iter().flatten() {
                    let keys = keys::verify_response(server, response, now_ms())?;
                    // The notary must have signed what it relays.
                    let mut object: ruma::CanonicalJsonObject = serde_json::from_value(response.clone()).map_err(|e| FederationError::Keys(e.to_string()))?;
                    if let Some(ruma::CanonicalJsonValue::Object(signatures)) = object.get_mut("signatures") {
                        signatures.retain(|signer, _| signer == notary.as_str());
                    }
                    let map = std::collections::BTreeMap::from([(notary.to_string(), notary_keys.clone())]);
                    ruma::signatures::verify_json(&map, &object).map_err(|e| FederationError::Keys(format!("{notary} did not sign what it relayed: {e}")))?;
                    return Ok(keys);
                }
                Err(FederationError::Keys(format!("{notary} knows no keys of {server}")))
            };
            match attempt.await {
                Ok(keys) => return Ok(keys),
                Err(error) => tracing::warn!(%notary, %server, %error, "notary could not give the server's keys"),
            }
        }
        Err(FederationError::Keys(format!("no notary gave the keys of {server}")))
    }

    /// A notary answer for `server`: its last key response, with our signature added; fetched
    /// again when it is older than `minimum_valid_until_ts` allows.
    pub async fn notary_response(&self, server: &ServerName, minimum_valid_until_ts: u64) -> Result<Option<JsonValue>, FederationError> {
        if server == self.server_name() {
            return Ok(Some(serde_json::to_value(self.own_keys()?).map_err(|e| FederationError::Keys(e.to_string()))?));
        }
        let cache = keys::KeyCache { store: &self.store };
        let mut cached = cache.get(server)?;
        let fresh_enough = cached.response.as_ref().and_then(|r| r.get("valid_until_ts")).and_then(JsonValue::as_u64).is_some_and(|valid| valid >= minimum_valid_until_ts.max(now_ms()));
        if !fresh_enough {
            match self.fetch_keys(server).await {
                Ok(fetched) => cached = cache.merge(server, fetched)?,
                Err(error) => tracing::info!(%server, %error, "cannot refresh the server's keys for a notary answer"),
            }
        }
        cached.response.as_ref().map(|response| keys::notarize(&self.key, response)).transpose()
    }

    pub fn key(&self) -> &ServerSigningKey {
        &self.key
    }
}

