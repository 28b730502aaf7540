//! Plugin routes (`/_limbic/plugins/<name>/…`, served by the plugin's `handle-http`) and the
//! admins' view of the loaded plugins.

use axum::{
    Json, Router,
    extract::{Path, Request, State},
    response::Response,
    routing::{any, get},
};

use super::{AppState, admin::Admin, authenticate};
use crate::error::{Error, ErrorCode, Result};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/_limbic/plugins/{name}", any(plugin_request))
        .route("/_limbic/plugins/{name}/{*path}", any(plugin_request))
        .route("/_limbic/admin/v1/plugins", get(plugin_status))
}

/// Hands the request to the plugin, with the caller when the request carries a valid access
/// token (an invalid one is refused here, before the plugin sees anything).
async fn plugin_request(State(server): State<AppState>, Path(params): Path<Vec<(String, String)>>, request: Request) -> Result<Response> {
    let param = |name: &str| params.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
    let name = param("name").unwrap_or_default();
    let path = format!("/{}", param("path").unwrap_or_default());
    let (parts, body) = request.into_parts();
    let caller = match authenticate(&server, &parts)? {
        Some(caller) => {
            let admin = server.users.account(&caller.user_id)?.is_some_and(|a| a.admin && !a.deactivated);
            Some((caller.user_id, admin))
        }
        None => None,
    };
    let limit = server.config.limits.max_request_body;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::new(ErrorCode::TooLarge, format!("request body is larger than {limit} bytes")))?;
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let request = crate::plugins::http_request(parts.method.as_str(), path, query, &parts.headers, body.to_vec(), caller);
    let answer = server.plugins.handle_http(&name, request).await?;
    crate::plugins::http_response(&name, answer)
}

/// `GET /_limbic/admin/v1/plugins`.
#[derive(serde::Serialize)]
struct PluginList {
    plugins: Vec<crate::plugins::PluginStatus>,
}

async fn plugin_status(State(server): State<AppState>, _admin: Admin) -> Json<PluginList> {
    Json(PluginList { plugins: server.plugins.status() })
}
