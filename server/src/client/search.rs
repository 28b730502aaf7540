//! POST /search: room events by keywords, through the search service.

use std::collections::BTreeMap;

use axum::{Json, Router, extract::State};
use ruma::api::client::search::search_events::v3::{self as search_events, OrderBy, SearchKeys};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, events::client_event, route};
use crate::{
    error::{Error, Result},
    ratelimit::Action,
    search::{self, Field, Order, Query},
    sync::{EventFilter, token},
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    route::<search_events::Request, _, _>(router, search)
}

const DEFAULT_LIMIT: usize = 10;
const MAX_LIMIT: usize = 100;
const MAX_CONTEXT: usize = 100;

fn field(key: &SearchKeys) -> Result<Field> {
    match key {
        SearchKeys::ContentBody => Ok(Field::Body),
        SearchKeys::ContentName => Ok(Field::Name),
        SearchKeys::ContentTopic => Ok(Field::Topic),
        other => Err(Error::invalid_param(format!("unknown search key {:?}", other.as_str()))),
    }
}

async fn search(State(server): State<AppState>, req: Ruma<search_events::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    server.rate_limiter.check(Action::Search, &req.rate_keys())?;
    let Some(criteria) = &req.body.search_categories.room_events else {
        return Ok(Json(json!({ "search_categories": {} })));
    };
    let fields = match &criteria.keys {
        Some(keys) => keys.iter().map(field).collect::<Result<Vec<_>>>()?,
        None => Field::ALL.to_vec(),
    };
    let order = match &criteria.order_by {
        None | Some(OrderBy::Rank) => Order::Rank,
        Some(OrderBy::Recent) => Order::Recent,
        Some(other) => return Err(Error::invalid_param(format!("unknown order_by {:?}", other.as_str()))),
    };
    let filter = EventFilter::from_json(serde_json::to_value(&criteria.filter).ok().as_ref());
    let results = search::search(&server.rooms, &Query {
        user_id: &caller.user_id,
        search_term: &criteria.search_term,
        fields: &fields,
        filter: &filter,
        order,
        limit: filter.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
        next_batch: req.body.next_batch.as_deref(),
    })?;

    // ruma fills in default context limits; context is only wanted when the client asked.
    let wants_context =
        req.json.as_ref().and_then(|j| j.pointer("/search_categories/room_events/event_context")).is_some();
    let context_limit = |l: ruma::UInt| usize::try_from(u64::from(l)).unwrap_or(MAX_CONTEXT).min(MAX_CONTEXT);
    let render = |pdu: &crate::events::Pdu, meta: &crate::rooms::EventMeta| client_event(&server, pdu, Some(meta), Some(caller), true);
    let mut rendered = Vec::new();
    for hit in &results.hits {
        let mut result = json!({ "rank": hit.rank, "result": render(&hit.pdu, &hit.meta) });
        if wants_context {
            let context = &criteria.event_context;
            let around = search::context(
                &server.rooms,
                &caller.user_id,
                hit,
                context_limit(context.before_limit),
                context_limit(context.after_limit),
                context.include_profile,
            )?;
            result["context"] = json!({
                "events_before": around.before.iter().map(|(p, m)| render(p, m)).collect::<Vec<_>>(),
                "events_after": around.after.iter().map(|(p, m)| render(p, m)).collect::<Vec<_>>(),
                "start": token(around.start),
                "end": token(around.end),
            });
            if context.include_profile {
                result["context"]["profile_info"] = json!(around.profiles);
            }
        }
        rendered.push(result);
    }

    let mut room_events = json!({
        "count": results.count,
        "results": rendered,
        "highlights": results.highlights,
    });
    if let Some(next_batch) = &results.next_batch {
        room_events["next_batch"] = json!(next_batch);
    }
    let mut groups = serde_json::Map::new();
    for grouping in &criteria.groupings.group_by {
        let Some(key) = &grouping.key else { continue };
        let group_of = |hit: &search::Hit| match key.as_str() {
            "room_id" => Ok(hit.pdu.room_id.to_string()),
            "sender" => Ok(hit.pdu.sender.to_string()),
            other => Err(Error::invalid_param(format!("unknown grouping key {other:?}"))),
        };
        let mut grouped: BTreeMap<String, (usize, Vec<&ruma::OwnedEventId>)> = BTreeMap::new();
        for hit in &results.hits {
            let order = grouped.len() + 1;
            grouped.entry(group_of(hit)?).or_insert_with(|| (order, Vec::new())).1.push(&hit.pdu.event_id);
        }
        let grouped: serde_json::Map<String, JsonValue> = grouped
            .into_iter()
            .map(|(group, (order, ids))| (group, json!({ "results": ids, "order": order })))
            .collect();
        groups.insert(key.as_str().to_owned(), JsonValue::Object(grouped));
    }
    if !groups.is_empty() {
        room_events["groups"] = JsonValue::Object(groups);
    }
    if criteria.include_state == Some(true) {
        let mut state = BTreeMap::new();
        for hit in &results.hits {
            if !state.contains_key(hit.pdu.room_id.as_str()) {
                let events = server.rooms.current_state(&hit.pdu.room_id)?;
                let events: Vec<JsonValue> = events.iter().map(|p| client_event(&server, p, None, Some(caller), true)).collect();
                state.insert(hit.pdu.room_id.to_string(), events);
            }
        }
        room_events["state"] = json!(state);
    }
    Ok(Json(json!({ "search_categories": { "room_events": room_events } })))
}
