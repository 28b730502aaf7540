//! Room summaries (MSC3266): `GET /_matrix/client/v1/room_summary/{roomIdOrAlias}` and its
//! unstable paths; the access token is optional. Who sees what: `Rooms::summary`.

use axum::{Json, Router, extract::State, routing::get};
use ruma::api::client::room::get_summary;
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, route};
use crate::error::{Error, Result};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_summary::v1::Request, _, _>(router, summary);
    // The unstable path Synapse recommends and matrix-js-sdk asks first; ruma knows only the
    // older `…/rooms/{roomIdOrAlias}/summary`.
    router.route("/_matrix/client/unstable/im.nheko.summary/summary/{room_id_or_alias}", get(summary))
}

async fn summary(State(server): State<AppState>, req: Ruma<get_summary::v1::Request>) -> Result<Json<JsonValue>> {
    // `via` is not used: rooms this server is not in are not summarised (spec/behaviour.md).
    let caller = req.caller_opt().map(|c| c.user_id.as_ref());
    let view = server.rooms.summary(&req.body.room_id_or_alias, caller)?;
    let mut body = serde_json::to_value(&view.summary).map_err(Error::internal)?;
    // ruma leaves `join_rule` out when it is `public` (the spec's default); clients such as
    // Element Call compare it, so it is always sent.
    body.as_object_mut().ok_or_else(|| Error::internal("summary is not an object"))?.entry("join_rule").or_insert(json!("public"));
    // Required when the caller is signed in: `leave` for no membership at all.
    if caller.is_some() {
        body["membership"] = json!(view.membership.map_or("leave", |m| m.as_str()));
    }
    Ok(Json(body))
}
