//! CORS: which pages on other origins a browser lets call which API (spec/cors.md).
//!
//! The Matrix APIs (client-server, media, `.well-known`) answer every origin, as the spec's "Web
//! Browser Clients" section asks: Element Web and other browser clients live on origins of their
//! own, and these APIs authenticate with bearer tokens, never cookies. Limbic's own `/_limbic`
//! APIs answer only the origins in `[web] cors_origins`: their pages (`/join`, `/clinic`) are
//! same-origin, so nothing else needs them by default. Federation is server-to-server.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use http::{HeaderName, HeaderValue, Method, header};
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// The CORS layers of the application, built once from the config.
pub struct Cors {
    matrix: CorsLayer,
    /// `None` when no origin is configured: `/_limbic` is same-origin only.
    limbic: Option<CorsLayer>,
}

impl Cors {
    /// `origins` are validated by the config (`scheme://host[:port]`).
    pub fn new(origins: &[String]) -> Self {
        let limbic = (!origins.is_empty()).then(|| {
            let origins = origins.iter().map(|origin| HeaderValue::from_str(origin).expect("validated origin"));
            allowed_requests(CorsLayer::new()).allow_origin(AllowOrigin::list(origins))
        });
        Self { matrix: allowed_requests(CorsLayer::new()).allow_origin(Any), limbic }
    }

    fn layer_for(&self, path: &str) -> Option<&CorsLayer> {
        if MATRIX_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
            Some(&self.matrix)
        } else if path == "/_limbic" || path.starts_with("/_limbic/") {
            self.limbic.as_ref()
        } else {
            None
        }
    }
}

/// Paths that answer every origin: the Matrix APIs browser clients call, and the MatrixRTC
/// call services Element Call (a page on its own origin) calls with tokens it got from them.
const MATRIX_PREFIXES: [&str; 6] =
    ["/_matrix/client/", "/_matrix/media/", "/.well-known/matrix/", "/_limbic/calls/", "/rtc/validate", "/rtc/v1/validate"];

/// Methods and request headers as Synapse allows them (the spec's list, plus HEAD and Date).
fn allowed_requests(layer: CorsLayer) -> CorsLayer {
    layer
        .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            HeaderName::from_static("x-requested-with"),
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::DATE,
        ])
}

/// Applies the policy of the request's path. Preflights (`OPTIONS`) are answered here, before
/// routing, so unknown paths and endpoints without `OPTIONS` answer them too.
pub async fn apply(State(cors): State<Arc<Cors>>, request: Request, next: Next) -> Response {
    match cors.layer_for(request.uri().path()) {
        Some(layer) => match layer.layer(next).oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => next.run(request).await,
    }
}
