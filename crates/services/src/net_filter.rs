//! Outbound HTTP to hosts that others name (push gateways, other servers, their OpenID and key
//! endpoints) must not reach this host or the networks behind it. A client built here resolves
//! every name itself, keeps only the addresses the filter permits and connects to one of those
//! (so a DNS answer that changes between check and connection changes nothing), refuses IP
//! literals the same way, follows no redirect and uses no proxy. Internal networks an operator
//! needs (an on-premise push gateway, a federation inside a LAN) are allowed by CIDR.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::network::AddressFilter;

/// Why a request was not sent or failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0} is an internal address this server may not reach (allow its network in the config if it should)")]
    Refused(IpAddr),
    #[error("{0:#}")]
    Http(#[from] reqwest::Error),
}

/// Resolves names with `inner` (the system resolver when `None`) and keeps the permitted
/// addresses; a name with none left fails to resolve.
struct FilteringResolver {
    filter: Arc<AddressFilter>,
    inner: Option<Arc<dyn reqwest::dns::Resolve>>,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let filter = self.filter.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = match inner {
                Some(inner) => inner.resolve(name).await?.collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = addrs.into_iter().partition(|addr| filter.permits(addr.ip()));
            if permitted.is_empty()
                && let Some(addr) = refused.first()
            {
                tracing::warn!(%host, address = %addr.ip(), "refused an outbound connection to an internal address");
                return Err(Box::new(FetchError::Refused(addr.ip())) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(permitted.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client whose connections only reach addresses its filter permits. Build requests
/// with [`Client::request`] and send them with [`Client::execute`], which also checks IP
/// literals (the resolver never sees those).
pub struct Client {
    http: reqwest::Client,
    filter: Arc<AddressFilter>,
}

impl Client {
    /// `builder` with redirects off, no proxy, and addresses resolved through `resolver` (the
    /// system's when `None`) and filtered.
    pub fn build(builder: reqwest::ClientBuilder, filter: AddressFilter, resolver: Option<Arc<dyn reqwest::dns::Resolve>>) -> reqwest::Result<Self> {
        let filter = Arc::new(filter);
        let http = builder
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(FilteringResolver { filter: filter.clone(), inner: resolver }))
            .build()?;
        Ok(Self { http, filter })
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http.request(method, url)
    }

    pub async fn execute(&self, request: reqwest::Request) -> Result<reqwest::Response, FetchError> {
        // URL parsing has already normalised other spellings of IPv4 (`0x7f.1`, `2130706433`).
        let literal = request.url().host_str().and_then(|host| host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok());
        if let Some(ip) = literal.filter(|ip| !self.filter.permits(*ip)) {
            tracing::warn!(url = %request.url(), "refused an outbound request to an internal address");
            return Err(FetchError::Refused(ip));
        }
        self.http.execute(request).await.map_err(|error| {
            // A name that resolved to refused addresses only: say so, not "cannot connect".
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(cause) = source {
                if let Some(FetchError::Refused(ip)) = cause.downcast_ref::<FetchError>() {
                    return FetchError::Refused(*ip);
                }
                source = cause.source();
            }
            FetchError::Http(error)
        })
    }
}
