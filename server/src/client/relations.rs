//! /relations and /threads, and the aggregations bundled into `unsigned.m.relations`.

use axum::{Json, Router, extract::State};
use ruma::{
    EventId, RoomId,
    api::{
        Direction,
        client::{
            relations::{get_relating_events, get_relating_events_with_rel_type, get_relating_events_with_rel_type_and_event_type},
            threads::get_threads,
        },
    },
};
use serde_json::{Value as JsonValue, json};

use super::{
    AppState, Ruma,
    events::{client_event, readable_snapshot},
    route,
};
use crate::{
    error::{Error, Result},
    rooms::relations::{MAX_DEPTH, Page, RelationsQuery},
    sync::{parse_token, token},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_relating_events::v1::Request, _, _>(router, relations);
    let router = route::<get_relating_events_with_rel_type::v1::Request, _, _>(router, relations_of_type);
    let router = route::<get_relating_events_with_rel_type_and_event_type::v1::Request, _, _>(router, relations_of_type_and_kind);
    route::<get_threads::v1::Request, _, _>(router, threads)
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

fn limit(requested: Option<ruma::UInt>, default: usize) -> usize {
    requested.map_or(default, |l| usize::try_from(u64::from(l)).unwrap_or(MAX_LIMIT)).clamp(1, MAX_LIMIT)
}

/// The parameters the three /relations endpoints share.
struct RelationsParams<'a> {
    room_id: &'a RoomId,
    event_id: &'a EventId,
    rel_type: Option<String>,
    kind: Option<String>,
    from: Option<&'a str>,
    to: Option<&'a str>,
    dir: Direction,
    limit: Option<ruma::UInt>,
    recurse: bool,
}

async fn relations(
    State(server): State<AppState>,
    req: Ruma<get_relating_events::v1::Request>,
) -> Result<Json<JsonValue>> {
    let body = &req.body;
    relations_page(&server, req.caller(), RelationsParams {
        room_id: &body.room_id,
        event_id: &body.event_id,
        rel_type: None,
        kind: None,
        from: body.from.as_deref(),
        to: body.to.as_deref(),
        dir: body.dir,
        limit: body.limit,
        recurse: body.recurse,
    })
}

async fn relations_of_type(
    State(server): State<AppState>,
    req: Ruma<get_relating_events_with_rel_type::v1::Request>,
) -> Result<Json<JsonValue>> {
    let body = &req.body;
    relations_page(&server, req.caller(), RelationsParams {
        room_id: &body.room_id,
        event_id: &body.event_id,
        rel_type: Some(body.rel_type.to_string()),
        kind: None,
        from: body.from.as_deref(),
        to: body.to.as_deref(),
        dir: body.dir,
        limit: body.limit,
        recurse: body.recurse,
    })
}

async fn relations_of_type_and_kind(
    State(server): State<AppState>,
    req: Ruma<get_relating_events_with_rel_type_and_event_type::v1::Request>,
) -> Result<Json<JsonValue>> {
    let body = &req.body;
    relations_page(&server, req.caller(), RelationsParams {
        room_id: &body.room_id,
        event_id: &body.event_id,
        rel_type: Some(body.rel_type.to_string()),
        kind: Some(body.event_type.to_string()),
        from: body.from.as_deref(),
        to: body.to.as_deref(),
        dir: body.dir,
        limit: body.limit,
        recurse: body.recurse,
    })
}

fn relations_page(server: &AppState, caller: &Caller, params: RelationsParams<'_>) -> Result<Json<JsonValue>> {
    readable_snapshot(server, params.room_id, &caller.user_id)?;
    let parent = server.rooms.visible_event(&caller.user_id, params.event_id)?;
    if parent.is_none_or(|(pdu, _)| pdu.room_id != params.room_id) {
        return Err(Error::not_found("event not found"));
    }
    let from = params.from.map(parse_token).transpose()?;
    let page = server.rooms.relating_events(&RelationsQuery {
        user_id: &caller.user_id,
        room_id: params.room_id,
        parent: params.event_id,
        rel_type: params.rel_type.as_deref(),
        kind: params.kind.as_deref(),
        recurse: params.recurse,
        from,
        to: params.to.map(parse_token).transpose()?,
        backward: params.dir == Direction::Backward,
        limit: limit(params.limit, DEFAULT_LIMIT),
    })?;
    let mut response = render_page(server, caller, &page);
    if let Some(from) = from {
        response["prev_batch"] = json!(token(from));
    }
    if params.recurse {
        response["recursion_depth"] = json!(MAX_DEPTH);
    }
    Ok(Json(response))
}

async fn threads(State(server): State<AppState>, req: Ruma<get_threads::v1::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let body = &req.body;
    readable_snapshot(&server, &body.room_id, &caller.user_id)?;
    let participated_only = match body.include {
        get_threads::v1::IncludeThreads::All => false,
        get_threads::v1::IncludeThreads::Participated => true,
        ref other => return Err(Error::invalid_param(format!("unknown include value {:?}", other.as_str()))),
    };
    let from = body.from.as_deref().map(parse_token).transpose()?;
    let page = server.rooms.threads(&body.room_id, &caller.user_id, from, participated_only, limit(body.limit, 10))?;
    Ok(Json(render_page(&server, caller, &page)))
}

fn render_page(server: &AppState, caller: &Caller, page: &Page) -> JsonValue {
    let chunk: Vec<JsonValue> = page.events.iter().map(|(p, m)| client_event(server, p, Some(m), Some(caller), true)).collect();
    let mut response = json!({ "chunk": chunk });
    if let Some(next) = page.next {
        response["next_batch"] = json!(token(next));
    }
    response
}
