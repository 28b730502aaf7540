//! Answers the framework gives before a handler runs (a path segment that is not UTF-8, a
//! method the route does not have, a malformed query for an axum extractor) are plain text;
//! on the APIs they become Matrix errors, so that every refusal a client sees carries an
//! `errcode`.

use axum::{
    extract::Request,
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{StatusCode, header::CONTENT_TYPE};

use crate::error::{Error, ErrorCode};

/// The prefixes of the JSON APIs; pages and LiveKit's endpoints keep their own formats.
const API_PREFIXES: &[&str] = &["/_matrix/", "/_limbic/", "/_synapse/"];

/// The biggest framework message kept in the `error` field.
const MESSAGE_LIMIT: usize = 1024;

pub async fn as_matrix_errors(request: Request, next: Next) -> Response {
    let api = API_PREFIXES.iter().any(|prefix| request.uri().path().starts_with(prefix));
    let response = next.run(request).await;
    let status = response.status();
    let json = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !api || json || !(status.is_client_error() || status.is_server_error()) || response.extensions().get::<crate::plugins::PluginAnswer>().is_some() {
        return response;
    }
    let message = match axum::body::to_bytes(response.into_body(), MESSAGE_LIMIT).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("request refused").to_owned(),
    };
    Error::with_status(code_for(status), status, message).into_response()
}

fn code_for(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => ErrorCode::Unrecognized,
        StatusCode::UNAUTHORIZED => ErrorCode::MissingToken,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::NotJson,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::BadJson,
        status if status.is_client_error() => ErrorCode::InvalidParam,
        _ => ErrorCode::Unknown,
    }
}
