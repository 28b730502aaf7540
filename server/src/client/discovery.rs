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

/// The spec versions claimed: those whose endpoints, and every earlier version's, Limbic serves
/// (spec/behaviour.md, "Spec versions claimed and why"). v1.16 added custom profile fields and
/// `use_state_after` in `/sync`, which Limbic does not serve, so the list ends at v1.15.
const VERSIONS: &[&str] = &[
    "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10",
    "v1.11", "v1.12", "v1.13", "v1.14", "v1.15",
];

/// The unstable features Limbic really serves, one a line: add yours here.
const UNSTABLE_FEATURES: &[&str] = &[
    // Delayed events (MSC4140).
    "org.matrix.msc4140",
    // Simplified sliding sync (MSC4186).
    "org.matrix.simplified_msc3575",
    // Room summaries (MSC3266), also at the unstable `im.nheko.summary` paths.
    "org.matrix.msc3266",
    // Authenticated media under /_matrix/client/v1/media (MSC3916, stable in v1.11): older
    // clients look for this flag.
    "org.matrix.msc3916.stable",
];

async fn versions(_req: Ruma<get_supported_versions::Request>) -> Json<JsonValue> {
    let unstable_features: serde_json::Map<String, JsonValue> = UNSTABLE_FEATURES.iter().map(|f| (f.to_string(), json!(true))).collect();
    Json(json!({ "versions": VERSIONS, "unstable_features": unstable_features }))
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
