//! Outbound federation HTTP: server discovery (well-known, SRV, A/AAAA), TLS with certificates
//! checked against the discovered name (web PKI and/or configured CAs), X-Matrix signatures.
//! Every connection (requests, key and OpenID look-ups, well-known) goes to public addresses
//! only, or to `[federation] allowed_networks` (`crate::net_filter`): a stranger names the
//! server we fetch keys or OpenID identities from.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hickory_resolver::TokioResolver;
use ruma::{
    ServerName,
    api::{
        IncomingResponseExt, OutgoingRequest, OutgoingRequestExt,
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
    },
    signatures::Ed25519KeyPair,
};
use serde_json::Value as JsonValue;

use super::{
    FederationError,
    resolve::{self, Connect, Name, Route, Srv},
};
use crate::{
    config::FederationConfig,
    net_filter,
    network::AddressFilter,
};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read from another server.
const MAX_RESPONSE: usize = 16 << 20;

/// Addresses to connect to for a TLS name, when discovery found a different target (SRV).
#[derive(Default, Clone)]
struct Overrides(Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>);

impl reqwest::dns::Resolve for Overrides {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let known = self.0.lock().unwrap_or_else(PoisonError::into_inner).get(name.as_str()).cloned();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match known {
                Some(addrs) => addrs,
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

pub struct Transport {
    http: net_filter::Client,
    overrides: Overrides,
    dns: TokioResolver,
}

impl Transport {
    pub fn new(config: &FederationConfig) -> Result<Self, FederationError> {
        let overrides = Overrides::default();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .tls_built_in_root_certs(config.trust_web_pki)
            .https_only(true);
        for path in &config.ca_certificates {
            let pem = std::fs::read(path).map_err(|e| FederationError::Tls(format!("cannot read {}: {e}", path.display())))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| FederationError::Tls(format!("{}: {e}", path.display())))? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let filter = AddressFilter::new(&config.allowed_networks);
        let http = net_filter::Client::build(builder, filter, Some(Arc::new(overrides.clone()))).map_err(|e| FederationError::Tls(e.to_string()))?;
        let dns = TokioResolver::builder_tokio().and_then(|builder| builder.build()).map_err(|e| FederationError::Tls(format!("DNS resolver: {e}")))?;
        Ok(Self { http, overrides, dns })
    }

    /// Discovers where `server` is, per the spec's steps.
    pub async fn discover(&self, server: &ServerName) -> Result<Route, FederationError> {
        let unreachable = |reason: String| FederationError::Unreachable { server: server.to_owned(), reason };
        let name = Name::parse(server.as_str()).ok_or_else(|| unreachable("not a valid server name".into()))?;
        if let Some(route) = resolve::direct(&name) {
            return Ok(route);
        }
        let delegated = self.well_known(&name.host).await;
        let effective = delegated.as_ref().unwrap_or(&name);
        let srv = if resolve::direct(effective).is_some() { None } else { self.srv(&effective.host).await };
        let route = resolve::after_lookups(&name, delegated.as_ref(), srv.as_ref());
        if let Connect::Lookup(target) = &route.connect
            && *target != route.tls_name
        {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.as_str(), route.port)).await.map_err(|e| unreachable(format!("{target}: {e}")))?.collect();
            self.overrides.0.lock().unwrap_or_else(PoisonError::into_inner).insert(route.tls_name.clone(), addrs);
        }
        Ok(route)
    }

    /// `m.server` of `https://<host>/.well-known/matrix/server`, if valid.
    async fn well_known(&self, host: &str) -> Option<Name> {
        let request = self.http.request(reqwest::Method::GET, &format!("https://{host}/.well-known/matrix/server")).timeout(WELL_KNOWN_TIMEOUT).build().ok()?;
        let response = self.http.execute(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body: JsonValue = response.json().await.ok()?;
        Name::parse(body.get("m.server")?.as_str()?)
    }

    async fn srv(&self, host: &str) -> Option<Srv> {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            if let Ok(answer) = self.dns.srv_lookup(format!("{service}.{host}.")).await
                && let Some(record) = answer.answers().iter().filter_map(|r| match &r.data { hickory_resolver::proto::rr::RData::SRV(srv) => Some(srv), _ => None }).min_by_key(|srv| srv.priority)
            {
                return Some(Srv { target: record.target.to_utf8(), port: record.port });
            }
        }
        None
    }

    fn base_url(route: &Route) -> String {
        let host = match route.connect {
            Connect::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => route.tls_name.clone(),
        };
        format!("https://{host}:{}", route.port)
    }

    async fn execute(&self, server: &ServerName, request: reqwest::Request) -> Result<(u16, Vec<u8>), FederationError> {
        let unreachable = |reason: String| FederationError::Unreachable { server: server.to_owned(), reason };
        let mut response = self.http.execute(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| unreachable(e.to_string()))? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(unreachable("response too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }

    /// An unauthenticated GET of JSON (key server endpoints).
    pub async fn get_json(&self, route: &Route, server: &ServerName, path: &str) -> Result<JsonValue, FederationError> {
        let request = self
            .http
            .request(reqwest::Method::GET, &format!("{}{path}", Self::base_url(route)))
            .header(http::header::HOST, &route.host_header)
            .build()
            .map_err(|e| FederationError::Unreachable { server: server.to_owned(), reason: e.to_string() })?;
        let (status, body) = self.execute(server, request).await?;
        if !(200..300).contains(&status) {
            return Err(FederationError::Remote { server: server.to_owned(), status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        serde_json::from_slice(&body).map_err(|e| FederationError::Remote { server: server.to_owned(), status, body: format!("not JSON: {e}") })
    }

    /// A signed request with a typed answer.
    pub async fn send<T>(&self, route: &Route, origin: &ServerName, destination: &ServerName, key: &Ed25519KeyPair, request: T) -> Result<T::IncomingResponse, FederationError>
    where
        T: OutgoingRequest<Authentication = ServerSignatures>,
        T::PathBuilder: ruma::api::path_builder::PathBuilder<Input<'static> = ()>,
    {
        let failed = |reason: String| FederationError::Unreachable { server: destination.to_owned(), reason };
        let signing = XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key);
        let mut http_request = request.try_into_http_request::<Vec<u8>>(&Self::base_url(route), signing, ()).map_err(|e| failed(e.to_string()))?;
        http_request.headers_mut().insert(http::header::HOST, http::HeaderValue::from_str(&route.host_header).map_err(|e| failed(e.to_string()))?);
        let request = reqwest::Request::try_from(http_request).map_err(|e| failed(e.to_string()))?;
        let (status, body) = self.execute(destination, request).await?;
        if !(200..300).contains(&status) {
            return Err(FederationError::Remote { server: destination.to_owned(), status, body: String::from_utf8_lossy(&body).into_owned() });
        }
        let response = http::Response::builder().status(status).body(body.as_slice()).map_err(|e| failed(e.to_string()))?;
        T::IncomingResponse::try_from_http_response(response).map_err(|e| FederationError::Remote { server: destination.to_owned(), status, body: format!("unexpected answer: {e}") })
    }
}
