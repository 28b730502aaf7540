//! GET /sync: builds the response from the sync service and long-polls on the stream watermark.

use std::{sync::atomic::Ordering, time::Duration};

use axum::{Json, Router, extract::State};
use ruma::api::client::{filter::FilterDefinition, sync::sync_events};
use serde_json::Value as JsonValue;

use super::{AppState, Ruma, events::client_event, route};
use crate::{
    error::{Error, Result},
    sync::{SyncFilter, SyncRequest, parse_token},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<sync_events::v3::Request, _, _>(router, sync)
}

const MAX_TIMEOUT: Duration = Duration::from_secs(120);

fn resolve_filter(server: &AppState, req: &Ruma<sync_events::v3::Request>) -> Result<SyncFilter> {
    let presence = server.config.presence.enabled;
    let definition = match &req.body.filter {
        None => None,
        Some(sync_events::v3::Filter::FilterId(id)) if id.starts_with('{') => {
            return Err(Error::bad_json("the inline filter is not valid JSON"));
        }
        Some(sync_events::v3::Filter::FilterId(id)) => Some(
            server
                .users
                .filter(&req.caller().user_id, id)?
                .ok_or_else(|| Error::not_found(format!("unknown filter {id}")))?,
        ),
        Some(sync_events::v3::Filter::FilterDefinition(definition)) => Some(definition_json(definition)?),
        Some(_) => None,
    };
    Ok(SyncFilter::from_json(definition.as_ref(), presence))
}

fn definition_json(definition: &FilterDefinition) -> Result<JsonValue> {
    serde_json::to_value(definition).map_err(|e| Error::bad_json(e.to_string()))
}

async fn sync(State(server): State<AppState>, req: Ruma<sync_events::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let filter = resolve_filter(&server, &req)?;
    let since = req.body.since.as_deref().map(parse_token).transpose()?;
    if server.config.presence.enabled {
        let wanted = req.body.set_presence.as_str();
        let current = server.users.presence(&caller.user_id)?;
        if current.as_ref().is_none_or(|p| p.presence != wanted) {
            server.users.set_presence(&caller.user_id, wanted, current.and_then(|p| p.status_msg))?;
            crate::federation::sender::presence_changed(&server, &caller.user_id)?;
        }
    }
    let request = SyncRequest { caller, since, full_state: req.body.full_state, filter: &filter };
    let render = |pdu: &crate::events::Pdu, meta: Option<&crate::rooms::EventMeta>| {
        let meta = meta.cloned().or_else(|| server.rooms.meta(&pdu.event_id).ok().flatten());
        client_event(&server, pdu, meta.as_ref(), Some(caller), false)
    };

    let timeout = req.body.timeout.unwrap_or_default().min(MAX_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe before reading the position so that no write can slip between the two.
    let mut watermark = server.store.streams().subscribe();
    loop {
        let upto = *watermark.borrow_and_update();
        let (body, has_data) = crate::sync::build(&server, &request, upto, &render)?;
        if has_data || since.is_none() || req.body.full_state || tokio::time::Instant::now() >= deadline {
            return Ok(Json(body));
        }
        server.metrics.sync_waiting.fetch_add(1, Ordering::Relaxed);
        let mut shutting_down = server.shutting_down.subscribe();
        let woke = tokio::select! {
            woke = tokio::time::timeout_at(deadline, watermark.changed()) => matches!(woke, Ok(Ok(()))),
            _ = shutting_down.wait_for(|stop| *stop) => false,
        };
        server.metrics.sync_waiting.fetch_sub(1, Ordering::Relaxed);
        if !woke {
            // Timed out (or the server is shutting down): answer with what there is.
            let upto = *watermark.borrow();
            return Ok(Json(crate::sync::build(&server, &request, upto, &render)?.0));
        }
    }
}
