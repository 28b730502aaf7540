//! The browser pages, built from `web/` into `[web] assets_dir` and read on each request (a
//! rebuilt page needs no restart):
//! - the join page (the target of appointment links): `/join` and anything under it answer with
//!   `index.html`; `/join/assets/<file>` serves its scripts and styles;
//! - the clinic console: `/clinic` and anything under it answer with `clinic/index.html`, whose
//!   Content-Security-Policy carries a fresh nonce for the styles its calendar injects;
//!   `/clinic/assets/<file>` serves the files of `clinic/`.

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;

/// Where the console's `index.html` asks for the nonce of this response.
const NONCE_PLACEHOLDER: &str = "__CSP_NONCE__";

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/join", get(join_page))
        .route("/join/", get(join_page))
        .route("/join/assets/{file}", get(join_asset))
        .route("/join/{*rest}", get(join_page))
        .route("/clinic", get(console_page))
        .route("/clinic/", get(console_page))
        .route("/clinic/assets/{file}", get(console_asset))
        .route("/clinic/{*rest}", get(console_page))
}

async fn join_page(State(server): State<AppState>) -> Response {
    match read(&server, "", "index.html").await {
        Ok(file) => file.into_response(),
        Err(refusal) => refusal,
    }
}

async fn join_asset(State(server): State<AppState>, Path(file): Path<String>) -> Response {
    asset(&server, "", &file).await
}

/// The console's page with its own Content-Security-Policy: scripts from this server only, styles
/// from this server or with this response's nonce (the calendar injects its styles).
async fn console_page(State(server): State<AppState>) -> Response {
    let file = match read(&server, "clinic", "index.html").await {
        Ok(file) => file,
        Err(refusal) => return refusal,
    };
    let nonce = crate::users::random_string(24);
    let html = String::from_utf8_lossy(&file.bytes).replace(NONCE_PLACEHOLDER, &nonce);
    let policy = format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'nonce-{nonce}'; img-src 'self' data: blob:; \
         media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; worker-src 'self' blob:; font-src 'self' data:; \
         object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    (
        [
            (header::CONTENT_TYPE, file.content_type.to_owned()),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            (header::CONTENT_SECURITY_POLICY, policy),
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        html,
    )
        .into_response()
}

async fn console_asset(State(server): State<AppState>, Path(file): Path<String>) -> Response {
    asset(&server, "clinic", &file).await
}

async fn asset(server: &AppState, app: &str, file: &str) -> Response {
    // One plain file name: nothing outside the app's directory.
    if file.is_empty() || file.starts_with('.') || file.contains(['/', '\\']) {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    }
    match read(server, app, file).await {
        Ok(file) => file.into_response(),
        Err(refusal) => refusal,
    }
}

/// A file of a built page, with its content type.
struct PageFile {
    bytes: Vec<u8>,
    content_type: &'static str,
}

impl IntoResponse for PageFile {
    fn into_response(self) -> Response {
        // The pages carry no secrets; they must not be cached stale across a rebuild.
        ([(header::CONTENT_TYPE, self.content_type), (header::CACHE_CONTROL, "no-cache")], self.bytes).into_response()
    }
}

async fn read(server: &AppState, app: &str, file: &str) -> Result<PageFile, Response> {
    let path = server.config.web.assets_dir.join(app).join(file);
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let content_type = match path.extension().and_then(|e| e.to_str()) {
                Some("html") => "text/html; charset=utf-8",
                Some("js" | "mjs") => "text/javascript; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                Some("svg") => "image/svg+xml",
                Some("png") => "image/png",
                Some("map" | "json") => "application/json",
                _ => "application/octet-stream",
            };
            Ok(PageFile { bytes, content_type })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && file == "index.html" => {
            tracing::warn!(path = %path.display(), "a browser page is not built");
            Err((StatusCode::SERVICE_UNAVAILABLE, "this page is not built: run `npm run build --prefix web`").into_response())
        }
        Err(_) => Err((StatusCode::NOT_FOUND, "no such asset").into_response()),
    }
}
