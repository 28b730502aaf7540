//! Delayed events (MSC4140): listing and updating the caller's scheduled events. Scheduling is
//! the `org.matrix.msc4140.delay` query parameter of the send and state endpoints (events.rs).

use axum::{Json, Router, extract::State};
use ruma::api::client::delayed_events::{
    get_all_delayed_events,
    update_delayed_event::{UpdateAction, unstable_v1, unstable_v2},
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route};
use crate::{
    delayed::Action,
    error::{Error, Result},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_all_delayed_events::unstable::Request, _, _>(router, list);
    let router = route::<unstable_v1::Request, _, _>(router, update);
    route::<unstable_v2::Request, _, _>(router, update_by_id)
}

fn action(action: &UpdateAction) -> Result<Action> {
    match action {
        UpdateAction::Cancel => Ok(Action::Cancel),
        UpdateAction::Restart => Ok(Action::Restart),
        UpdateAction::Send => Ok(Action::Send),
        other => Err(Error::invalid_param(format!("unknown action {other:?}: use cancel, restart or send"))),
    }
}

async fn list(State(server): State<AppState>, req: Ruma<get_all_delayed_events::unstable::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(json!({ "delayed_events": server.delayed.list(&server, &req.caller().user_id)? })))
}

/// `POST …/delayed_events/{delay_id}` with `{"action": …}`: the caller's own events only.
async fn update(State(server): State<AppState>, req: Ruma<unstable_v1::Request>) -> Result<RumaResponse<unstable_v1::Response>> {
    let action = action(&req.body.action)?;
    server.delayed.update(&server, &req.body.delay_id, action, Some(&req.caller().user_id)).await?;
    Ok(unstable_v1::Response::new().into())
}

/// `POST …/delayed_events/{delay_id}/{action}` without an access token: whoever holds the delay
/// id (an SFU the client handed it to) may act on the event.
async fn update_by_id(State(server): State<AppState>, req: Ruma<unstable_v2::Request>) -> Result<RumaResponse<unstable_v2::Response>> {
    let action = action(&req.body.action)?;
    server.delayed.update(&server, &req.body.delay_id, action, None).await?;
    Ok(unstable_v2::Response::new().into())
}
