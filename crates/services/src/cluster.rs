//! The nodes sharing one database as each other's HTTP peers: each node registers where the
//! others reach its client API ([`tables::NODE_URLS`], `[cluster] url`), and a request only
//! another node can answer (one continuing a sliding sync connection that node holds, one about
//! a call that node serves) is passed to it with the caller's own credentials, which it checks
//! as any other request's. On the embedded store there is one node, and nothing is passed on.

use std::{sync::Arc, time::Duration};

use crate::{
    error::{Error, ErrorCode, Result},
    store::{Store, tables},
};

/// The header a request passed on to another node carries (the node it came through), so that
/// it is never passed on again.
pub const FORWARDED: &str = "x-limbic-forwarded-by";

/// Whether a request was passed on by another node already: it is answered here, whatever.
pub fn passed_on(headers: &http::HeaderMap) -> bool {
    headers.contains_key(FORWARDED)
}

pub struct Peers {
    store: Arc<Store>,
    /// This node's name when the store is shared; `None` on the embedded store.
    node: Option<String>,
    /// Where the other nodes reach this one.
    url: String,
    http: reqwest::Client,
}

impl Peers {
    pub fn new(store: Arc<Store>, node_name: &str, url: String) -> Result<Self> {
        let node = store.is_shared().then(|| node_name.to_owned());
        // Nodes are the operator's: their addresses are private ones, and nothing redirects.
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().map_err(Error::internal)?;
        Ok(Self { store, node, url, http })
    }

    /// This node's name among the others; `None` on the embedded store.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Says where the others reach this node (at start).
    pub fn register(&self) -> Result<()> {
        let Some(me) = &self.node else { return Ok(()) };
        let mut batch = self.store.batch();
        batch.put(tables::NODE_URLS, me.as_bytes(), self.url.as_bytes());
        Ok(self.store.write(batch)?)
    }

    /// Where the others reach `node`, if the database counts it alive.
    pub fn url_of(&self, node: &str) -> Result<Option<String>> {
        if !self.store.live_nodes()?.unwrap_or_default().iter().any(|live| live == node) {
            return Ok(None);
        }
        Ok(self.store.get(tables::NODE_URLS, node.as_bytes())?.map(|url| String::from_utf8_lossy(&url).into_owned()))
    }

    /// Passes a request (its method, path with query, `Authorization` and `Content-Type`, and
    /// body) to the node at `base` (an `http(s)://` URL, or the `ws(s)://` one of its
    /// signalling), waiting up to `timeout`, and returns its status, `Content-Type` and body.
    pub async fn forward(&self, base: &str, method: http::Method, uri: &http::Uri, headers: &http::HeaderMap, body: bytes::Bytes, timeout: Duration) -> Result<http::Response<bytes::Bytes>> {
        let base = base.replacen("wss://", "https://", 1).replacen("ws://", "http://", 1);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut forwarded = self.http.request(method, format!("{base}{path}")).timeout(timeout).header(FORWARDED, self.node.as_deref().unwrap_or_default());
        for name in [http::header::AUTHORIZATION, http::header::CONTENT_TYPE] {
            if let Some(value) = headers.get(&name) {
                forwarded = forwarded.header(name, value);
            }
        }
        let unreachable = |error: reqwest::Error| Error::with_status(ErrorCode::Unknown, http::StatusCode::BAD_GATEWAY, format!("the node to answer this did not: {error}"));
        let answer = forwarded.body(body).send().await.map_err(unreachable)?;
        let mut response = http::Response::builder().status(answer.status());
        if let Some(content_type) = answer.headers().get(http::header::CONTENT_TYPE) {
            response = response.header(http::header::CONTENT_TYPE, content_type);
        }
        response.body(answer.bytes().await.map_err(unreachable)?).map_err(Error::internal)
    }
}
