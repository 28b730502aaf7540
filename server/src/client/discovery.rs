//! Server discovery and capabilities: /versions, /.well-known/matrix/client, /capabilities.

use axum::{Json, Router, extract::State};
use ruma::api::client::discovery::{get_capabilities, get_supported_versions};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, route};
use crate::events::{DEFAULT_ROOM_VERSION, SUPPORTED_ROOM_VERSIONS};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_supported_versions::Request, _, _>(router, versions);
    let router = route::<get_capabilities::v3::Request, _, _>(router, capabilities);
    router.route("/.well-known/matrix/client", axum::routing::get(well_known))
}

async fn versions(_req: Ruma<get_supported_versions::Request>) -> Json<JsonValue> {
    Json(json!({
        "versions": [
            "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6",
            "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"
        ],
        "unstable_features": { "org.matrix.msc4140": true, "org.matrix.simplified_msc3575": true },
    }))
}

async fn well_known(State(server): State<AppState>) -> Json<JsonValue> {
    let listen = &server.config.listen;
    let mut answer = json!({
        "m.homeserver": { "base_url": format!("http://{}:{}", listen.address, listen.port) },
    });
    let foci = super::calls::foci(&server);
    if !foci.is_empty() {
        answer["org.matrix.msc4143.rtc_foci"] = json!(foci);
    }
    Json(answer)
}

async fn capabilities(
    State(server): State<AppState>,
    _req: Ruma<get_capabilities::v3::Request>,
) -> Json<JsonValue> {
    let available: serde_json::Map<String, JsonValue> =
        SUPPORTED_ROOM_VERSIONS.iter().map(|v| (v.to_string(), json!("stable"))).collect();
    Json(json!({
        "capabilities": {
            "m.change_password": { "enabled": true },
            "m.room_versions": { "default": DEFAULT_ROOM_VERSION.to_string(), "available": available },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
            "org.limbic.presence": { "enabled": server.config.presence.enabled },
        }
    }))
}
