//! The browser join page: `/join` (and anything under it, for the page's own routes) answers
//! with its `index.html`; `/join/assets/<file>` serves its built scripts and styles. Files come
//! from `[web] assets_dir`, read on each request so a rebuilt page needs no restart.

use axum::{
    Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/join", get(page))
        .route("/join/", get(page))
        .route("/join/assets/{file}", get(asset))
        .route("/join/{*rest}", get(page))
}

async fn page(State(server): State<AppState>) -> Response {
    serve(&server, "index.html").await
}

async fn asset(State(server): State<AppState>, Path(file): Path<String>) -> Response {
    // One plain file name: nothing outside the assets directory.
    if file.is_empty() || file.starts_with('.') || file.contains(['/', '\\']) {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    }
    serve(&server, &file).await
}

async fn serve(server: &AppState, file: &str) -> Response {
    let path = server.config.web.assets_dir.join(file);
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
            // The page carries no secrets; it must not be cached stale across a rebuild.
            ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], bytes).into_response()
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && file == "index.html" => {
            tracing::warn!(path = %path.display(), "the join page is not built");
            (StatusCode::SERVICE_UNAVAILABLE, "the join page is not built: run `npm run build --prefix web`").into_response()
        }
        Err(_) => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
