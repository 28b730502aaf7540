//! Sending and reading events: send, state, redact, /messages, /context, /event, and the
//! client event format with `unsigned`.

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    response::{IntoResponse, Response},
};
use ruma::{
    OwnedEventId, UserId,
    api::client::{
        context::get_context,
        message::{get_message_events, send_message_event},
        redact::redact_event,
        room::{get_event_by_timestamp, get_room_event},
        state::{get_state_event_for_key, get_state_events, send_state_event},
    },
    events::TimelineEventType,
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, route, url_query_param};
use crate::{
    delayed::{DELAY_PARAM, NewDelayedEvent},
    error::{Error, Result},
    events::{Pdu, PduBuilder},
    ratelimit::Action,
    rooms::{EventMeta, ReadView, TxnInfo},
    store::{StreamPos, tables},
    rooms::{HistoryKey, TIMELINE_ORDER, history_key_before},
    sync::{EventFilter, history_token, parse_history_token, token},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<send_message_event::v3::Request, _, _>(router, send_message);
    let router = route::<send_state_event::v3::Request, _, _>(router, send_state);
    let router = route::<get_state_event_for_key::v3::Request, _, _>(router, get_state_event);
    let router = route::<get_state_events::v3::Request, _, _>(router, get_state);
    let router = route::<redact_event::v3::Request, _, _>(router, redact);
    let router = route::<get_message_events::v3::Request, _, _>(router, messages);
    let router = route::<get_context::v3::Request, _, _>(router, context);
    let router = route::<get_room_event::v3::Request, _, _>(router, room_event);
    let router = route::<get_event_by_timestamp::v1::Request, _, _>(router, event_by_timestamp);
    // State events with an empty state key may be addressed without the trailing segment.
    let mut router = router;
    for prefix in ["/_matrix/client/v3", "/_matrix/client/r0"] {
        router = router.route(
            &format!("{prefix}/rooms/{{room_id}}/state/{{event_type}}"),
            axum::routing::get(get_state_event).put(send_state),
        );
        router = router.route(
            &format!("{prefix}/rooms/{{room_id}}/state/{{event_type}}/"),
            axum::routing::get(get_state_event).put(send_state),
        );
    }
    router
}

/// The event as a client sees it, with `unsigned` computed for `viewer`.
pub(super) fn client_event(server: &AppState, pdu: &Pdu, meta: Option<&EventMeta>, viewer: Option<&Caller>, with_room_id: bool) -> JsonValue {
    let mut unsigned = serde_json::Map::new();
    let now: u64 = ruma::MilliSecondsSinceUnixEpoch::now().0.into();
    unsigned.insert("age".into(), json!(now.saturating_sub(pdu.origin_server_ts.0.into())));
    if let Some(meta) = meta {
        if let (Some(txn), Some(viewer)) = (&meta.txn, viewer)
            && viewer.user_id == pdu.sender
            && viewer.device_id.as_str() == txn.device_id
        {
            unsigned.insert("transaction_id".into(), json!(txn.txn_id));
        }
        if let Some(replaced) = &meta.replaces_state
            && let Ok(Some(prev)) = server.rooms.pdu(replaced)
        {
            unsigned.insert("prev_content".into(), prev.content_json());
            unsigned.insert("replaces_state".into(), json!(replaced));
            unsigned.insert("prev_sender".into(), json!(prev.sender));
        }
        if let Some(redacted_by) = &meta.redacted_by
            && let Ok(Some(redaction)) = server.rooms.pdu(redacted_by)
        {
            unsigned.insert("redacted_because".into(), redaction.to_client_event(None, true));
        }
    }
    // Redacted events lose their aggregations.
    if let Some(viewer) = viewer
        && meta.is_none_or(|m| m.redacted_by.is_none())
        && let Ok(Some(relations)) = bundle(server, pdu, &viewer.user_id, with_room_id)
    {
        unsigned.insert("m.relations".into(), relations);
    }
    pdu.to_client_event(Some(JsonValue::Object(unsigned)), with_room_id)
}

/// The aggregations of `pdu` as `viewer` may see them, for `unsigned.m.relations`.
fn bundle(server: &AppState, pdu: &Pdu, viewer: &UserId, with_room_id: bool) -> Result<Option<JsonValue>> {
    let aggregations = server.rooms.aggregations(pdu, viewer)?;
    let mut relations = serde_json::Map::new();
    if let Some(edit) = aggregations.replace {
        relations.insert("m.replace".into(), edit.to_client_event(None, true));
    }
    if let Some(thread) = aggregations.thread {
        let unsigned = thread
            .latest_edit
            .map(|edit| json!({ "m.relations": { "m.replace": edit.to_client_event(None, true) } }));
        relations.insert(
            "m.thread".into(),
            json!({
                "latest_event": thread.latest.to_client_event(unsigned, with_room_id),
                "count": thread.count,
                "current_user_participated": thread.participated,
            }),
        );
    }
    if !aggregations.references.is_empty() {
        let chunk: Vec<JsonValue> = aggregations.references.iter().map(|id| json!({ "event_id": id })).collect();
        relations.insert("m.reference".into(), json!({ "chunk": chunk }));
    }
    Ok((!relations.is_empty()).then_some(JsonValue::Object(relations)))
}

/// Loads an event and its metadata.
pub(super) fn load_event(server: &AppState, event_id: &ruma::EventId) -> Result<(Pdu, EventMeta)> {
    let pdu = server.rooms.pdu(event_id)?.ok_or_else(|| Error::not_found("event not found"))?;
    let meta = server.rooms.meta(event_id)?.ok_or_else(|| Error::not_found("event not found"))?;
    Ok((pdu, meta))
}

fn txn_event(server: &AppState, caller: &Caller, txn_id: &str) -> Result<Option<OwnedEventId>> {
    let key = crate::rooms::txn_key(&caller.user_id, &TxnInfo { device_id: caller.device_id.to_string(), txn_id: txn_id.to_owned() });
    Ok(server
        .store
        .get(tables::TXN_IDS, &key)?
        .and_then(|id| String::from_utf8(id).ok())
        .and_then(|id| id.try_into().ok()))
}

/// Appends one event from a local user and commits it.
async fn send_event(
    server: &AppState,
    sender: &UserId,
    room_id: &ruma::RoomId,
    builder: PduBuilder,
    txn: Option<TxnInfo>,
) -> Result<OwnedEventId> {
    Ok(server.send_local_event(sender, room_id, builder, txn, None).await?.event_id)
}

/// The delay of `?org.matrix.msc4140.delay=<ms>`, which schedules the event (MSC4140).
fn requested_delay(query: Option<&str>) -> Result<Option<u64>> {
    let Some(value) = query.and_then(|query| url_query_param(query, DELAY_PARAM)) else { return Ok(None) };
    value.parse().map(Some).map_err(|_| Error::invalid_param(format!("{DELAY_PARAM} must be a whole number of milliseconds")))
}

/// Schedules the event instead of sending it; clients get its delay id.
async fn schedule(server: &AppState, caller: &Caller, new: NewDelayedEvent<'_>) -> Result<Response> {
    let delay_id = server.delayed.schedule(server, caller, new).await?;
    Ok(Json(json!({ "delay_id": delay_id })).into_response())
}

async fn send_message(
    State(server): State<AppState>,
    RawQuery(query): RawQuery,
    req: Ruma<send_message_event::v3::Request>,
) -> Result<Response> {
    let caller = req.caller();
    let delay = requested_delay(query.as_deref())?;
    if delay.is_none()
        && let Some(event_id) = txn_event(&server, caller, req.body.txn_id.as_str())?
    {
        return Ok(RumaResponse(send_message_event::v3::Response::new(event_id)).into_response());
    }
    server.rate_limiter.check(Action::Message, &req.rate_keys())?;
    let content: JsonValue = serde_json::from_str(req.body.body.json().get()).map_err(|e| Error::bad_json(e.to_string()))?;
    let room_id = &req.body.room_id;
    let builder = server.local_events().builder(room_id, &req.body.event_type.to_string(), None, content)?;
    if let Some(delay_ms) = delay {
        return schedule(&server, caller, NewDelayedEvent { room_id, event: builder, delay_ms, txn_id: Some(req.body.txn_id.as_str()) }).await;
    }
    let txn = TxnInfo { device_id: caller.device_id.to_string(), txn_id: req.body.txn_id.to_string() };
    let event_id = send_event(&server, &caller.user_id, room_id, builder, Some(txn)).await?;
    Ok(RumaResponse(send_message_event::v3::Response::new(event_id)).into_response())
}

async fn send_state(
    State(server): State<AppState>,
    RawQuery(query): RawQuery,
    req: Ruma<send_state_event::v3::Request>,
) -> Result<Response> {
    let caller = req.caller();
    server.rate_limiter.check(Action::StateEvent, &req.rate_keys())?;
    let delay = requested_delay(query.as_deref())?;
    let content: JsonValue = serde_json::from_str(req.body.body.json().get()).map_err(|e| Error::bad_json(e.to_string()))?;
    let room_id = &req.body.room_id;
    let builder = server.local_events().builder(room_id, &req.body.event_type.to_string(), Some(&req.body.state_key), content)?;
    if let Some(delay_ms) = delay {
        return schedule(&server, caller, NewDelayedEvent { room_id, event: builder, delay_ms, txn_id: None }).await;
    }
    let attempt = send_event(&server, &caller.user_id, room_id, builder, None);
    // A raw knock or join may carry a session passcode too: guesses are limited the same way.
    let event_id = if req.body.event_type == ruma::events::StateEventType::RoomMember {
        super::membership::limit_passcode_guesses(&server, &req, room_id, attempt).await?
    } else {
        attempt.await?
    };
    Ok(RumaResponse(send_state_event::v3::Response::new(event_id)).into_response())
}

/// How much of the room the caller may read ([`crate::rooms::Rooms::read_view`]); `403` when
/// nothing.
pub(super) fn read_view(server: &AppState, room_id: &ruma::RoomId, user_id: &UserId) -> Result<ReadView> {
    server.rooms.read_view(user_id, room_id)?.ok_or_else(|| Error::forbidden("you are not a member of this room"))
}

/// The state snapshot the caller reads: `None` for the current state, else their leave's.
pub(super) fn readable_snapshot(server: &AppState, room_id: &ruma::RoomId, user_id: &UserId) -> Result<Option<u64>> {
    Ok(match read_view(server, room_id, user_id)? {
        ReadView::Current => None,
        ReadView::AsOfLeave { snapshot, .. } => Some(snapshot),
    })
}

async fn get_state_event(
    State(server): State<AppState>,
    req: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    let kind = req.body.event_type.to_string();
    let pdu = match readable_snapshot(&server, room_id, &caller.user_id)? {
        None => server.rooms.state_event(room_id, &kind, &req.body.state_key)?,
        Some(snapshot) => {
            let map = server.rooms.state_map(snapshot)?;
            match map.get(&(kind, req.body.state_key.clone())) {
                Some(id) => server.rooms.pdu(id)?,
                None => None,
            }
        }
    };
    let pdu = pdu.ok_or_else(|| Error::not_found("state event not found"))?;
    Ok(Json(pdu.content_json()))
}

async fn get_state(
    State(server): State<AppState>,
    req: Ruma<get_state_events::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    let events = match readable_snapshot(&server, room_id, &caller.user_id)? {
        None => server.rooms.current_state(room_id)?,
        Some(snapshot) => server.rooms.state_events(snapshot, |_, _| true)?,
    };
    let events: Vec<JsonValue> = events
        .iter()
        .map(|pdu| {
            let meta = server.rooms.meta(&pdu.event_id).ok().flatten();
            client_event(&server, pdu, meta.as_ref(), Some(caller), true)
        })
        .collect();
    Ok(Json(JsonValue::Array(events)))
}

async fn redact(
    State(server): State<AppState>,
    req: Ruma<redact_event::v3::Request>,
) -> Result<RumaResponse<redact_event::v3::Response>> {
    let caller = req.caller();
    if let Some(event_id) = txn_event(&server, caller, req.body.txn_id.as_str())? {
        return Ok(redact_event::v3::Response::new(event_id).into());
    }
    let room_id = &req.body.room_id;
    let target = server.rooms.pdu(&req.body.event_id)?.filter(|p| &p.room_id == room_id);
    let Some(target) = target else {
        return Err(Error::not_found("event not found in this room"));
    };
    if target.sender != caller.user_id {
        let power = server.rooms.user_power_level(room_id, &caller.user_id)?;
        let needed = server
            .rooms
            .state_content(room_id, "m.room.power_levels", "")?
            .and_then(|p| p.get("redact").and_then(JsonValue::as_i64))
            .unwrap_or(50);
        if power < needed {
            return Err(Error::forbidden("you may not redact other users' events"));
        }
    }
    let version = server.rooms.room(room_id)?.ok_or_else(|| Error::not_found("unknown room"))?.version;
    let mut content = json!({});
    if let Some(reason) = &req.body.reason {
        content["reason"] = json!(reason);
    }
    let mut builder = PduBuilder::message(TimelineEventType::RoomRedaction, content);
    if version == ruma::RoomVersionId::V10 {
        builder.redacts = Some(target.event_id.clone());
    } else {
        builder.content["redacts"] = json!(target.event_id);
    }
    let txn = TxnInfo { device_id: caller.device_id.to_string(), txn_id: req.body.txn_id.to_string() };
    let event_id = send_event(&server, &caller.user_id, room_id, builder, Some(txn)).await?;
    Ok(redact_event::v3::Response::new(event_id).into())
}

/// Member events of the senders of `events`, for lazy-loading.
pub(super) fn lazy_members(server: &AppState, snapshot: u64, senders: impl IntoIterator<Item = String>) -> Result<Vec<Pdu>> {
    let map = server.rooms.state_map(snapshot)?;
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for sender in senders {
        if seen.insert(sender.clone())
            && let Some(id) = map.get(&("m.room.member".to_owned(), sender))
            && let Some(pdu) = server.rooms.pdu(id)?
        {
            out.push(pdu);
        }
    }
    Ok(out)
}

async fn messages(
    State(server): State<AppState>,
    req: Ruma<get_message_events::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    let view = read_view(&server, room_id, &caller.user_id)?;
    let filter = EventFilter::from_json(serde_json::to_value(&req.body.filter).ok().as_ref());
    let limit = usize::try_from(u64::from(req.body.limit)).unwrap_or(10).clamp(1, 1000);
    let backwards = req.body.dir == ruma::api::Direction::Backward;
    // A member who left sees history only up to leaving.
    let ceiling = match view {
        ReadView::AsOfLeave { pos, .. } => pos,
        ReadView::Current => StreamPos::MAX,
    };
    // What another node acknowledged before this request is in its answer.
    server.store.streams().catch_up()?;
    let current = server.store.streams().current().min(ceiling);
    let latest = (current, TIMELINE_ORDER);
    let from = match &req.body.from {
        Some(token) => parse_history_token(token)?.min(latest),
        None if backwards => latest,
        None => (0, TIMELINE_ORDER),
    };
    let to = req.body.to.as_deref().map(parse_history_token).transpose()?;

    let mut chunk = Vec::new();
    let mut end = from;
    let mut exhausted = true;
    // Paging back in a room joined over federation can reach an event whose prev events this
    // server never had: that history is fetched from the room's other servers, and the walk
    // goes on through it.
    let mut cursor = from;
    let reader = crate::rooms::Reader::User(&caller.user_id);
    let in_room = server.rooms.reader_in_room(reader, room_id)?;
    loop {
        let mut gap = None;
        let entries: Box<dyn Iterator<Item = Result<(HistoryKey, OwnedEventId)>>> = if backwards {
            Box::new(server.rooms.history_before(room_id, cursor))
        } else {
            Box::new(server.rooms.history_after(room_id, cursor, current))
        };
        for entry in entries {
            let (key, event_id) = entry?;
            if let Some(to) = to
                && ((backwards && key <= to) || (!backwards && key > to))
            {
                break;
            }
            if chunk.len() >= limit {
                exhausted = false;
                break;
            }
            end = if backwards { history_key_before(key) } else { key };
            let (pdu, meta) = load_event(&server, &event_id)?;
            let has_gap = backwards && server.federation.is_some() && pdu.prev_events.iter().any(|id| !matches!(server.rooms.pdu(id), Ok(Some(_))));
            if filter.allows(&pdu) && server.rooms.can_see_in(reader, &in_room, &pdu, &meta)? {
                chunk.push((pdu.clone(), meta));
            }
            if has_gap {
                gap = Some((key, pdu));
                break;
            }
        }
        let Some((key, pdu)) = gap else { break };
        let wanted = limit.saturating_sub(chunk.len()).max(1);
        if let Err(error) = crate::federation::inbound::backfill_before(&*server, &pdu, key, wanted).await {
            tracing::warn!(%room_id, event_id = %pdu.event_id, %error, "backfilling failed");
        }
        cursor = end;
    }
    let mut state = Vec::new();
    if filter.lazy_load_members
        && let Some((_, meta)) = chunk.first()
    {
        let snapshot = meta.state_after;
        let senders = chunk.iter().map(|(p, _)| p.sender.to_string());
        for pdu in lazy_members(&server, snapshot, senders)? {
            state.push(client_event(&server, &pdu, None, Some(caller), true));
        }
    }
    let mut response = json!({
        "start": history_token(from),
        "chunk": chunk.iter().map(|(p, m)| client_event(&server, p, Some(m), Some(caller), true)).collect::<Vec<_>>(),
        "state": state,
    });
    if !exhausted || (!chunk.is_empty() && !backwards) {
        response["end"] = json!(history_token(end));
    }
    Ok(Json(response))
}

async fn context(
    State(server): State<AppState>,
    req: Ruma<get_context::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let room_id = &req.body.room_id;
    read_view(&server, room_id, &caller.user_id)?;
    let (pdu, meta) = load_event(&server, &req.body.event_id)?;
    if &pdu.room_id != room_id || !server.rooms.user_can_see(&caller.user_id, &pdu, &meta)? {
        return Err(Error::not_found("event not found"));
    }
    let filter = EventFilter::from_json(serde_json::to_value(&req.body.filter).ok().as_ref());
    let limit = usize::try_from(u64::from(req.body.limit)).unwrap_or(10).min(100);
    let half = limit / 2;
    let before_limit = limit - half;
    let collect = |entries: Box<dyn Iterator<Item = Result<(StreamPos, OwnedEventId)>> + '_>, max: usize| -> Result<(Vec<(Pdu, EventMeta)>, StreamPos)> {
        let mut out = Vec::new();
        let mut last = meta.pos;
        for entry in entries {
            if out.len() >= max {
                break;
            }
            let (pos, event_id) = entry?;
            last = pos;
            let (p, m) = load_event(&server, &event_id)?;
            if filter.allows(&p) && server.rooms.user_can_see(&caller.user_id, &p, &m)? {
                out.push((p, m));
            }
        }
        Ok((out, last))
    };
    server.store.streams().catch_up()?;
    let current = server.store.streams().current();
    let (before, before_pos) = collect(Box::new(server.rooms.timeline_before(room_id, meta.pos - 1)), before_limit)?;
    let (after, after_pos) = collect(Box::new(server.rooms.timeline_after(room_id, meta.pos, current)), half)?;
    let state = server.rooms.state_events(meta.state_after, |_, _| true)?;
    let render = |events: &[(Pdu, EventMeta)]| events.iter().map(|(p, m)| client_event(&server, p, Some(m), Some(caller), true)).collect::<Vec<_>>();
    Ok(Json(json!({
        "event": client_event(&server, &pdu, Some(&meta), Some(caller), true),
        "events_before": render(&before),
        "events_after": render(&after),
        "start": token(before_pos.saturating_sub(1)),
        "end": token(after_pos),
        "state": state.iter().map(|p| client_event(&server, p, None, Some(caller), true)).collect::<Vec<_>>(),
    })))
}

async fn room_event(
    State(server): State<AppState>,
    req: Ruma<get_room_event::v3::Request>,
) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    read_view(&server, &req.body.room_id, &caller.user_id)?;
    let (pdu, meta) = load_event(&server, &req.body.event_id)?;
    if pdu.room_id != req.body.room_id || !server.rooms.user_can_see(&caller.user_id, &pdu, &meta)? {
        return Err(Error::not_found("event not found"));
    }
    Ok(Json(client_event(&server, &pdu, Some(&meta), Some(caller), true)))
}

/// `timestamp_to_event`: the closest event the caller may see, to a point in time.
async fn event_by_timestamp(
    State(server): State<AppState>,
    req: Ruma<get_event_by_timestamp::v1::Request>,
) -> Result<RumaResponse<get_event_by_timestamp::v1::Response>> {
    let caller = req.caller();
    readable_snapshot(&server, &req.body.room_id, &caller.user_id)?;
    let forward = req.body.dir == ruma::api::Direction::Forward;
    let (event_id, ts) = server
        .rooms
        .event_near_timestamp(&caller.user_id, &req.body.room_id, req.body.ts.0.into(), forward)?
        .ok_or_else(|| Error::not_found("no event found at that time"))?;
    Ok(get_event_by_timestamp::v1::Response::new(event_id, ruma::MilliSecondsSinceUnixEpoch(ts.try_into().unwrap_or_default())).into())
}
