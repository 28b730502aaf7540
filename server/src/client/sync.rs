//! GET /sync (v3) and simplified sliding sync (MSC4186): build the response from the sync
//! service and long-poll on the stream watermark.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use axum::{Json, Router, extract::State, response::IntoResponse};
use ruma::api::client::{filter::FilterDefinition, sync::sync_events};
use ruma::OwnedRoomId;
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, events::client_event, route};
use crate::{
    error::{Error, Result},
    store::StreamPos,
    sync::{SyncFilter, SyncRequest, parse_token, sliding::SlidingRequest},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<sync_events::v3::Request, _, _>(router, sync);
    route::<sync_events::v5::Request, _, _>(router, sliding_sync)
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
            crate::federation::sender::presence_changed(&*server, &caller.user_id)?;
        }
    }
    let request = SyncRequest { caller, since, full_state: req.body.full_state, filter: &filter };
    let render = |pdu: &crate::events::Pdu, meta: Option<&crate::rooms::EventMeta>| {
        let meta = meta.cloned().or_else(|| server.rooms.meta(&pdu.event_id).ok().flatten());
        client_event(&server, pdu, meta.as_ref(), Some(caller), false)
    };

    let timeout = req.body.timeout.unwrap_or_default().min(MAX_TIMEOUT);
    let answer_at_once = since.is_none() || req.body.full_state;
    let body = long_poll(&server, timeout, |upto| {
        let (body, has_data) = crate::sync::build(&*server, &request, upto, &render)?;
        Ok((body, has_data || answer_at_once))
    })
    .await?;
    Ok(Json(body))
}

/// Builds a response up to the stream watermark, and while `build` says it carries nothing
/// new, waits for the watermark to move, up to `timeout`; the last build is answered then.
async fn long_poll<T>(server: &AppState, timeout: Duration, mut build: impl FnMut(StreamPos) -> Result<(T, bool)>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Subscribe before reading the position so that no write can slip between the two.
    let mut watermark = server.store.streams().subscribe();
    // What another node acknowledged before this request is in its answer.
    server.store.streams().catch_up()?;
    loop {
        let upto = *watermark.borrow_and_update();
        let (body, ready) = build(upto)?;
        if ready || tokio::time::Instant::now() >= deadline {
            return Ok(body);
        }
        // Not kept while waiting: every connected client waits here most of the time.
        drop(body);
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
            return Ok(build(upto)?.0);
        }
    }
}

/// Simplified sliding sync (MSC4186). A connection another node holds is continued there.
async fn sliding_sync(State(server): State<AppState>, uri: axum::http::Uri, headers: axum::http::HeaderMap, req: Ruma<sync_events::v5::Request>) -> Result<axum::response::Response> {
    if let Some(holder) = req.body.pos.as_deref().and_then(|pos| server.sliding_sync.holder(pos))
        && !crate::cluster::passed_on(&headers)
        && let Some(url) = server.peers.url_of(holder)?
    {
        let body = req.json.as_ref().map(serde_json::to_vec).transpose().map_err(Error::internal)?.unwrap_or_default();
        // The holder long-polls as asked: waited for that long, and a while more.
        let wait = req.body.timeout.unwrap_or_default().min(MAX_TIMEOUT) + FORWARDED_GRACE;
        let answer = server.peers.forward(&url, axum::http::Method::POST, &uri, &headers, body.into(), wait).await?;
        return Ok(answer.map(axum::body::Body::from));
    }
    let caller = req.caller();
    let conn_id = req.body.conn_id.as_deref().unwrap_or_default();
    let previous = server.sliding_sync.resume(caller, conn_id, req.body.pos.as_deref())?;
    let list_spaces = list_spaces(req.json.as_ref())?;
    let request = SlidingRequest {
        caller,
        lists: &req.body.lists,
        list_spaces: &list_spaces,
        room_subscriptions: &req.body.room_subscriptions,
        extensions: &req.body.extensions,
    };
    let render = |pdu: &crate::events::Pdu, meta: Option<&crate::rooms::EventMeta>| {
        let meta = meta.cloned().or_else(|| server.rooms.meta(&pdu.event_id).ok().flatten());
        client_event(&server, pdu, meta.as_ref(), Some(caller), false)
    };
    let timeout = req.body.timeout.unwrap_or_default().min(MAX_TIMEOUT);
    let response = long_poll(&server, timeout, |upto| {
        let response = crate::sync::sliding::build(&*server, &request, &previous, upto, &render)?;
        let ready = response.has_data;
        Ok((response, ready))
    })
    .await?;
    let mut body = response.body;
    body["pos"] = json!(server.sliding_sync.save(caller, conn_id, response.state));
    if let Some(txn_id) = &req.body.txn_id {
        body["txn_id"] = json!(txn_id);
    }
    Ok(Json(body).into_response())
}

/// How much longer than the long-poll itself a node waits for the node it passed it to.
const FORWARDED_GRACE: Duration = Duration::from_secs(30);

/// The `spaces` filter of each list, which ruma's request type does not carry.
fn list_spaces(body: Option<&JsonValue>) -> Result<BTreeMap<String, Vec<OwnedRoomId>>> {
    let mut spaces = BTreeMap::new();
    let lists = body.and_then(|b| b.get("lists")).and_then(JsonValue::as_object);
    for (name, list) in lists.into_iter().flatten() {
        let Some(ids) = list.pointer("/filters/spaces") else { continue };
        let ids: Vec<OwnedRoomId> = serde_json::from_value(ids.clone())
            .map_err(|e| Error::bad_json(format!("lists.{name}.filters.spaces must be a list of room ids: {e}")))?;
        spaces.insert(name.clone(), ids);
    }
    Ok(spaces)
}
