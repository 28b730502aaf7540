//! Outbound HTTP (capability `http`), only to the hosts the operator granted in the server
//! config. Not allowed during `check-event`.
//!
//! ```no_run
//! use limbic_plugin_sdk::{OutboundRequest, http};
//!
//! # fn main() -> Result<(), limbic_plugin_sdk::Error> {
//! let response = http::fetch(&OutboundRequest::get("https://calendar.example/health"))?;
//! if response.status != 200 { /* ... */ }
//! # Ok(())
//! # }
//! ```

use crate::{Error, HttpResponse, OutboundRequest, bindings::limbic::plugin::host};

/// Sends the request and returns the response (any status; only a request that could not be
/// made at all is an error: an ungranted host, a timeout, a connection failure).
pub fn fetch(request: &OutboundRequest) -> Result<HttpResponse, Error> {
    Ok(host::http_fetch(request)?)
}
