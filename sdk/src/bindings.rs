//! The bindings `wit-bindgen` generates from `wit/plugin.wit` (world `plugin`).
//!
//! Hidden from the docs: plugins use the re-exported types, the wrappers in [`crate::kv`],
//! [`crate::rooms`], [`crate::http`], [`crate::log`] and [`crate::clock`], and
//! [`export_plugin!`](crate::export_plugin). The attributes below only add docs (for the WIT
//! items that have none) and derives; they change nothing in the contract.

// The generated glue passes flattened records to the canonical ABI functions.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "plugin",
    path: "wit",
    // `export_plugin!` (in plugin crates) expands to this macro, which finds the generated
    // glue through `$crate`, so plugins need no direct dependency on wit-bindgen.
    pub_export_macro: true,
    export_macro_name: "__export_plugin_world",
    default_bindings_module: "$crate::bindings",
    additional_derives: [PartialEq, Eq],
    additional_type_attributes: {
        "limbic:plugin/types@0.1.0/room-spec": [#[derive(Default)]],
        "limbic:plugin/types@0.1.0/log-level": [#[doc = " How severe a log message is."]],
        "limbic:plugin/types@0.1.0/http-response": [#[doc = " An HTTP response: a plugin route's answer, or what `http::fetch` got back."]],
        "limbic:plugin/types@0.1.0/member": [#[doc = " A room member and their membership."]],
    },
    additional_member_attributes: {
        "limbic:plugin/types@0.1.0/event.event-id": [#[doc = " The event id (`$...`)."]],
        "limbic:plugin/types@0.1.0/event.room-id": [#[doc = " The room the event belongs to (`!...:server`)."]],
        "limbic:plugin/types@0.1.0/event.sender": [#[doc = " The user who sent it (`@...:server`)."]],
        "limbic:plugin/types@0.1.0/event.event-type": [#[doc = " The event type, e.g. `m.room.message` or `org.limbic.session`."]],
        "limbic:plugin/types@0.1.0/event.origin-server-ts": [#[doc = " When the sending server says it was sent, in ms since the Unix epoch."]],
        "limbic:plugin/types@0.1.0/verdict.allow": [#[doc = " Lets the event through (as far as this plugin is concerned)."]],
        "limbic:plugin/types@0.1.0/log-level.error": [#[doc = " Something failed."]],
        "limbic:plugin/types@0.1.0/log-level.warn": [#[doc = " Something looks wrong but the plugin carries on."]],
        "limbic:plugin/types@0.1.0/log-level.info": [#[doc = " Normal operation worth recording."]],
        "limbic:plugin/types@0.1.0/log-level.debug": [#[doc = " Detail for debugging; usually filtered out."]],
        "limbic:plugin/types@0.1.0/matrix-error.status": [#[doc = " The HTTP status the server would have answered a client with."]],
        "limbic:plugin/types@0.1.0/matrix-error.errcode": [#[doc = " The Matrix error code, e.g. `M_FORBIDDEN`."]],
        "limbic:plugin/types@0.1.0/matrix-error.message": [#[doc = " A human-readable explanation."]],
        "limbic:plugin/types@0.1.0/caller.user-id": [#[doc = " The Matrix user id behind the access token."]],
        "limbic:plugin/types@0.1.0/caller.is-admin": [#[doc = " Whether that user is a server admin."]],
        "limbic:plugin/types@0.1.0/http-request.method": [#[doc = " The HTTP method in upper case (`GET`, `POST`, ...)."]],
        "limbic:plugin/types@0.1.0/http-request.headers": [#[doc = " The request headers as (name, value) pairs; names are lower case."]],
        "limbic:plugin/types@0.1.0/http-request.body": [#[doc = " The request body (empty if there is none)."]],
        "limbic:plugin/types@0.1.0/http-response.status": [#[doc = " The HTTP status code."]],
        "limbic:plugin/types@0.1.0/http-response.headers": [#[doc = " The response headers as (name, value) pairs."]],
        "limbic:plugin/types@0.1.0/http-response.body": [#[doc = " The response body."]],
        "limbic:plugin/types@0.1.0/outbound-request.method": [#[doc = " The HTTP method (`GET`, `PUT`, ...)."]],
        "limbic:plugin/types@0.1.0/outbound-request.url": [#[doc = " The absolute URL (`https://host/path?query`)."]],
        "limbic:plugin/types@0.1.0/outbound-request.headers": [#[doc = " The request headers as (name, value) pairs."]],
        "limbic:plugin/types@0.1.0/outbound-request.body": [#[doc = " The request body (empty for none)."]],
        "limbic:plugin/types@0.1.0/state-entry.event-type": [#[doc = " The state event's type."]],
        "limbic:plugin/types@0.1.0/state-entry.state-key": [#[doc = " The state key (`\"\"` for most room-wide state)."]],
        "limbic:plugin/types@0.1.0/state-entry.content": [#[doc = " The content, as JSON text of an object."]],
        "limbic:plugin/types@0.1.0/member.user-id": [#[doc = " The member's Matrix user id."]],
        "limbic:plugin/types@0.1.0/room-spec.name": [#[doc = " The room name (`m.room.name`), if any."]],
        "limbic:plugin/types@0.1.0/room-spec.topic": [#[doc = " The room topic (`m.room.topic`), if any."]],
    },
});
