//! The error type every service returns, and its mapping to Matrix error responses.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use limbic_store::StoreError;

/// Matrix error codes Limbic returns, each with its usual HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Forbidden,
    UnknownToken,
    MissingToken,
    BadJson,
    NotJson,
    NotFound,
    Unrecognized,
    UserInUse,
    InvalidUsername,
    RoomInUse,
    BadAlias,
    InvalidRoomState,
    InvalidParam,
    MissingParam,
    TooLarge,
    Exclusive,
    UnsupportedRoomVersion,
    BadState,
    GuestAccessForbidden,
    UserDeactivated,
    WeakPassword,
    ResourceLimitExceeded,
    CannotOverwriteMedia,
    NotYetUploaded,
    /// A sliding sync position the server no longer knows (MSC4186).
    UnknownPos,
    /// A federation request without a valid X-Matrix signature.
    Unauthorized,
    IncompatibleRoomVersion,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forbidden => "M_FORBIDDEN",
            Self::UnknownToken => "M_UNKNOWN_TOKEN",
            Self::MissingToken => "M_MISSING_TOKEN",
            Self::BadJson => "M_BAD_JSON",
            Self::NotJson => "M_NOT_JSON",
            Self::NotFound => "M_NOT_FOUND",
            Self::Unrecognized => "M_UNRECOGNIZED",
            Self::UserInUse => "M_USER_IN_USE",
            Self::InvalidUsername => "M_INVALID_USERNAME",
            Self::RoomInUse => "M_ROOM_IN_USE",
            Self::BadAlias => "M_BAD_ALIAS",
            Self::InvalidRoomState => "M_INVALID_ROOM_STATE",
            Self::InvalidParam => "M_INVALID_PARAM",
            Self::MissingParam => "M_MISSING_PARAM",
            Self::TooLarge => "M_TOO_LARGE",
            Self::Exclusive => "M_EXCLUSIVE",
            Self::UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            Self::BadState => "M_BAD_STATE",
            Self::GuestAccessForbidden => "M_GUEST_ACCESS_FORBIDDEN",
            Self::UserDeactivated => "M_USER_DEACTIVATED",
            Self::WeakPassword => "M_WEAK_PASSWORD",
            Self::ResourceLimitExceeded => "M_RESOURCE_LIMIT_EXCEEDED",
            Self::CannotOverwriteMedia => "M_CANNOT_OVERWRITE_MEDIA",
            Self::NotYetUploaded => "M_NOT_YET_UPLOADED",
            Self::UnknownPos => "M_UNKNOWN_POS",
            Self::Unauthorized => "M_UNAUTHORIZED",
            Self::IncompatibleRoomVersion => "M_INCOMPATIBLE_ROOM_VERSION",
            Self::Unknown => "M_UNKNOWN",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Self::Forbidden | Self::GuestAccessForbidden | Self::UserDeactivated => {
                StatusCode::FORBIDDEN
            }
            Self::UnknownToken | Self::MissingToken | Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::Unrecognized => StatusCode::NOT_FOUND,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::CannotOverwriteMedia => StatusCode::CONFLICT,
            Self::NotYetUploaded => StatusCode::GATEWAY_TIMEOUT,
            Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Matrix { code: ErrorCode, message: String, status: StatusCode },
    #[error("too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    /// User-interactive authentication: the 401 carrying the flows and the session.
    #[error("user-interactive authentication required")]
    Uiaa(serde_json::Value),
    /// A Matrix error whose body carries fields beyond `errcode` and `error`.
    #[error("{body}")]
    Detailed { status: StatusCode, body: serde_json::Value },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Matrix { code, message: message.into(), status: code.status() }
    }

    pub fn with_status(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        Self::Matrix { code, message: message.into(), status }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadJson, message)
    }

    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParam, message)
    }

    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::Internal(message.to_string())
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Matrix { code, .. } => *code,
            Self::LimitExceeded { .. } | Self::Uiaa(_) | Self::Detailed { .. } | Self::Store(_) | Self::Internal(_) => {
                ErrorCode::Unknown
            }
        }
    }
}

impl Error {
    /// Whether the same request may succeed a moment later: its write met a concurrent one
    /// (another node's), or a claim it needed was held by another writer (503).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Store(StoreError::Conflict { .. } | StoreError::Contention) | Self::Matrix { status: StatusCode::SERVICE_UNAVAILABLE, .. }
        )
    }

    /// The status and body a client gets for this error: the one mapping of errors to Matrix
    /// error responses. Internal failures are logged here and answered without their details.
    fn response_parts(&self) -> (StatusCode, serde_json::Value) {
        match self {
            Self::Matrix { code, message, status } => (*status, json!({ "errcode": code.as_str(), "error": message })),
            Self::LimitExceeded { retry_after_ms } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too many requests",
                    "retry_after_ms": retry_after_ms,
                }),
            ),
            Self::Uiaa(body) => (StatusCode::UNAUTHORIZED, body.clone()),
            Self::Detailed { status, body } => (*status, body.clone()),
            // Another node wrote to the room (or record) first while this one's hold on it
            // had ended: nothing was written, and the same request again succeeds.
            Self::Store(err @ (StoreError::Conflict { .. } | StoreError::Contention)) => {
                tracing::warn!(error = %err, "a write met another node's");
                (StatusCode::SERVICE_UNAVAILABLE, json!({ "errcode": "M_UNKNOWN", "error": "the write met a concurrent one and was not made; try again" }))
            }
            Self::Store(err) => {
                tracing::error!(error = %err, "storage failure");
                (StatusCode::INTERNAL_SERVER_ERROR, json!({ "errcode": "M_UNKNOWN", "error": "internal storage error" }))
            }
            Self::Internal(message) => {
                tracing::error!(%message, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, json!({ "errcode": "M_UNKNOWN", "error": "internal server error" }))
            }
        }
    }

    /// The status, errcode and message a client gets for this error (for answers that are not
    /// HTTP responses: a WebSocket close, a plugin's host call).
    pub fn describe(&self) -> (StatusCode, String, String) {
        let (status, body) = self.response_parts();
        let field = |name: &str| body.get(name).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        (status, field("errcode"), field("error"))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = self.response_parts();
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `describe` says (a WebSocket close, a plugin's host call) is what the HTTP response
    /// says, internal failures included: their details stay in the log.
    #[test]
    fn describe_and_the_response_agree_for_every_kind_of_error() {
        let errors = [
            Error::forbidden("not yours"),
            Error::LimitExceeded { retry_after_ms: 10 },
            Error::Uiaa(json!({ "errcode": "M_FORBIDDEN", "error": "wrong password", "flows": [] })),
            Error::Detailed { status: StatusCode::FORBIDDEN, body: json!({ "errcode": "M_FORBIDDEN", "error": "not yet" }) },
            Error::Store(StoreError::Corrupt { table: "users", reason: "the record of @secret:example".into() }),
            Error::internal("the key file /etc/limbic/key is unreadable"),
        ];
        for error in errors {
            let (status, errcode, message) = error.describe();
            let response = error.into_response();
            assert_eq!(response.status(), status);
            let (_, body) = response.into_parts();
            let body = body_json(body);
            assert_eq!((body["errcode"].as_str(), body["error"].as_str()), (Some(errcode.as_str()), Some(message.as_str())));
            assert!(!message.contains("secret") && !message.contains("/etc/"), "{message}");
        }
    }

    /// What the federation receiver tries again: a write that met a concurrent one, a claim
    /// held by another writer; never a refusal or a failure that would only repeat.
    #[test]
    fn only_concurrent_writes_and_held_claims_are_transient() {
        let busy = Error::with_status(ErrorCode::Unknown, StatusCode::SERVICE_UNAVAILABLE, "another session of @t:x is being booked at this moment; try again");
        for transient in [Error::Store(StoreError::Contention), Error::Store(StoreError::Conflict { table: "rooms" }), busy] {
            assert!(transient.is_transient(), "{transient:?}");
        }
        let lasting = [
            Error::forbidden("event not authorized"),
            Error::with_status(ErrorCode::Forbidden, StatusCode::CONFLICT, "double-booked"),
            Error::Store(StoreError::Corrupt { table: "pdus", reason: "truncated".into() }),
            Error::internal("missing state snapshot 12"),
            Error::LimitExceeded { retry_after_ms: 10 },
        ];
        for error in lasting {
            assert!(!error.is_transient(), "{error:?}");
        }
    }

    /// The JSON of a response body (axum's bodies here are complete at once).
    fn body_json(body: axum::body::Body) -> serde_json::Value {
        let bytes = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(axum::body::to_bytes(body, usize::MAX)).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}
