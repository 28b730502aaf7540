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
    /// The status, errcode and message a client gets for this error.
    pub fn describe(&self) -> (StatusCode, String, String) {
        let field = |body: &serde_json::Value, name: &str| body.get(name).and_then(serde_json::Value::as_str).unwrap_or_default().to_owned();
        match self {
            Self::Matrix { code, message, status } => (*status, code.as_str().to_owned(), message.clone()),
            Self::LimitExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED".into(), "Too many requests".into()),
            Self::Uiaa(body) => (StatusCode::UNAUTHORIZED, field(body, "errcode"), field(body, "error")),
            Self::Detailed { status, body } => (*status, field(body, "errcode"), field(body, "error")),
            Self::Store(_) | Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN".into(), self.to_string()),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Self::Matrix { code, message, status } => {
                (status, json!({ "errcode": code.as_str(), "error": message }))
            }
            Self::LimitExceeded { retry_after_ms } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too many requests",
                    "retry_after_ms": retry_after_ms,
                }),
            ),
            Self::Uiaa(body) => (StatusCode::UNAUTHORIZED, body),
            Self::Detailed { status, body } => (status, body),
            Self::Store(err) => {
                tracing::error!(error = %err, "storage failure");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "errcode": "M_UNKNOWN", "error": "internal storage error" }),
                )
            }
            Self::Internal(message) => {
                tracing::error!(%message, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({ "errcode": "M_UNKNOWN", "error": "internal server error" }),
                )
            }
        };
        (status, axum::Json(body)).into_response()
    }
}
