//! Push rules, pushers and the notification list.

use axum::{Json, Router, extract::State};
use ruma::{
    api::client::push::{
        delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions,
        get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule,
        set_pushrule_actions, set_pushrule_enabled,
    },
    push::{InsertPushRuleError, RemovePushRuleError, RuleKind, Ruleset},
};
use serde_json::{Value as JsonValue, json};

use super::{AppState, Ruma, RumaResponse, events::client_event, route};
use crate::{
    error::{Error, Result},
    push::{PUSH_RULES, Push},
    sync::{parse_token, token},
    users::Caller,
};

pub(super) fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_pushrules_all::v3::Request, _, _>(router, all_rules);
    let router = route::<get_pushrules_global_scope::v3::Request, _, _>(router, global_rules);
    let router = route::<get_pushrule::v3::Request, _, _>(router, get_rule);
    let router = route::<set_pushrule::v3::Request, _, _>(router, set_rule);
    let router = route::<delete_pushrule::v3::Request, _, _>(router, delete_rule);
    let router = route::<get_pushrule_enabled::v3::Request, _, _>(router, get_enabled);
    let router = route::<set_pushrule_enabled::v3::Request, _, _>(router, set_enabled);
    let router = route::<get_pushrule_actions::v3::Request, _, _>(router, get_actions);
    let router = route::<set_pushrule_actions::v3::Request, _, _>(router, set_actions);
    let router = route::<get_pushers::v3::Request, _, _>(router, pushers);
    let router = route::<set_pusher::v3::Request, _, _>(router, set_pusher_handler);
    route::<get_notifications::v3::Request, _, _>(router, notifications)
}

fn not_found() -> Error {
    Error::not_found("unknown push rule")
}

/// The rule as JSON, looked up in the ruleset's own serialization.
fn rule_json(rules: &Ruleset, kind: &RuleKind, rule_id: &str) -> Result<JsonValue> {
    let all = serde_json::to_value(rules).map_err(Error::internal)?;
    all.get(kind.as_str())
        .and_then(JsonValue::as_array)
        .and_then(|rules| rules.iter().find(|r| r.get("rule_id").and_then(JsonValue::as_str) == Some(rule_id)))
        .cloned()
        .ok_or_else(not_found)
}

/// Applies `change` to the caller's rules and saves them as account data.
fn update_rules(server: &AppState, caller: &Caller, change: impl FnOnce(&mut Ruleset) -> Result<()>) -> Result<()> {
    let mut rules = (*server.push.ruleset(&caller.user_id)?).clone();
    change(&mut rules)?;
    // Every node forgets the rules it kept once this is written (the change is announced).
    server.users.set_account_data(&caller.user_id, None, PUSH_RULES, Push::ruleset_content(&rules))?;
    Ok(())
}

async fn all_rules(State(server): State<AppState>, req: Ruma<get_pushrules_all::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(Push::ruleset_content(&*server.push.ruleset(&req.caller().user_id)?)))
}

async fn global_rules(State(server): State<AppState>, req: Ruma<get_pushrules_global_scope::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(serde_json::to_value(&*server.push.ruleset(&req.caller().user_id)?).map_err(Error::internal)?))
}

async fn get_rule(State(server): State<AppState>, req: Ruma<get_pushrule::v3::Request>) -> Result<Json<JsonValue>> {
    let rules = server.push.ruleset(&req.caller().user_id)?;
    Ok(Json(rule_json(&rules, &req.body.kind, &req.body.rule_id)?))
}

async fn set_rule(State(server): State<AppState>, req: Ruma<set_pushrule::v3::Request>) -> Result<RumaResponse<set_pushrule::v3::Response>> {
    let body = &req.body;
    update_rules(&server, req.caller(), |rules| {
        rules.insert(body.rule.clone(), body.after.as_deref(), body.before.as_deref()).map_err(|e| match e {
            InsertPushRuleError::UnknownRuleId => Error::not_found(e.to_string()),
            other => Error::invalid_param(other.to_string()),
        })
    })?;
    Ok(set_pushrule::v3::Response::new().into())
}

async fn delete_rule(State(server): State<AppState>, req: Ruma<delete_pushrule::v3::Request>) -> Result<RumaResponse<delete_pushrule::v3::Response>> {
    let body = &req.body;
    update_rules(&server, req.caller(), |rules| {
        rules.remove(body.kind.clone(), &body.rule_id).map_err(|e| match e {
            RemovePushRuleError::NotFound => not_found(),
            other => Error::invalid_param(other.to_string()),
        })
    })?;
    Ok(delete_pushrule::v3::Response::new().into())
}

async fn get_enabled(State(server): State<AppState>, req: Ruma<get_pushrule_enabled::v3::Request>) -> Result<Json<JsonValue>> {
    let rules = server.push.ruleset(&req.caller().user_id)?;
    let rule = rules.get(req.body.kind.clone(), &req.body.rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "enabled": rule.enabled() })))
}

async fn set_enabled(State(server): State<AppState>, req: Ruma<set_pushrule_enabled::v3::Request>) -> Result<RumaResponse<set_pushrule_enabled::v3::Response>> {
    let body = &req.body;
    update_rules(&server, req.caller(), |rules| {
        rules.set_enabled(body.kind.clone(), &body.rule_id, body.enabled).map_err(|_| not_found())
    })?;
    Ok(set_pushrule_enabled::v3::Response::new().into())
}

async fn get_actions(State(server): State<AppState>, req: Ruma<get_pushrule_actions::v3::Request>) -> Result<Json<JsonValue>> {
    let rules = server.push.ruleset(&req.caller().user_id)?;
    let rule = rules.get(req.body.kind.clone(), &req.body.rule_id).ok_or_else(not_found)?;
    Ok(Json(json!({ "actions": rule.actions() })))
}

async fn set_actions(State(server): State<AppState>, req: Ruma<set_pushrule_actions::v3::Request>) -> Result<RumaResponse<set_pushrule_actions::v3::Response>> {
    let body = &req.body;
    update_rules(&server, req.caller(), |rules| {
        rules.set_actions(body.kind.clone(), &body.rule_id, body.actions.clone()).map_err(|_| not_found())
    })?;
    Ok(set_pushrule_actions::v3::Response::new().into())
}

async fn pushers(State(server): State<AppState>, req: Ruma<get_pushers::v3::Request>) -> Result<Json<JsonValue>> {
    Ok(Json(json!({ "pushers": server.push.pushers(&req.caller().user_id)? })))
}

async fn set_pusher_handler(State(server): State<AppState>, req: Ruma<set_pusher::v3::Request>) -> Result<RumaResponse<set_pusher::v3::Response>> {
    let pusher = req.json.clone().unwrap_or_default();
    server.push.set_pusher(req.caller(), &pusher)?;
    Ok(set_pusher::v3::Response::new().into())
}

async fn notifications(State(server): State<AppState>, req: Ruma<get_notifications::v3::Request>) -> Result<Json<JsonValue>> {
    let caller = req.caller();
    let from = req.body.from.as_deref().map(parse_token).transpose()?.unwrap_or(u64::MAX);
    let limit = req.body.limit.map_or(20, |l| u64::from(l).clamp(1, 100) as usize);
    let only_highlight = req.body.only.as_deref() == Some("highlight");
    let found = server.push.notifications(&caller.user_id, from, limit, only_highlight)?;
    let mut list = Vec::new();
    for (pos, notification) in &found {
        // The event that caused it is the room's at its position (gone if the event was purged).
        let Some(event_id) = server.rooms.timeline_event(&notification.room_id, *pos)? else { continue };
        let Some((pdu, meta)) = server.rooms.visible_event(&caller.user_id, &event_id)? else { continue };
        let read = server.rooms.read_position(&caller.user_id, &notification.room_id)? >= *pos;
        list.push(json!({
            "actions": notification.actions,
            "event": client_event(&server, &pdu, Some(&meta), Some(caller), true),
            "read": read,
            "room_id": notification.room_id,
            "ts": pdu.origin_server_ts,
        }));
    }
    let mut response = json!({ "notifications": list });
    if found.len() == limit
        && let Some((pos, _)) = found.last()
    {
        response["next_token"] = json!(token(pos - 1));
    }
    Ok(Json(response))
}
