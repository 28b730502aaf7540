//! The SDK's error type.

use std::fmt;

use crate::{HostError, MatrixError};

/// Why a host call or one of the SDK's JSON helpers failed.
///
/// The first five variants are the WIT `host-error` cases. `Display` writes the WIT case name and
/// its detail, e.g. `not-granted: http` or `refused: 403 M_FORBIDDEN: not a therapist`, and
/// `?` turns an `Error` into the `String` errors of [`Plugin`](crate::Plugin)'s methods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The capability named is not granted to this plugin (the manifest does not declare it,
    /// or the operator did not grant it).
    NotGranted(String),
    /// Not allowed in this hook: writes and outbound HTTP during `check-event`.
    NotAllowed(String),
    /// The arguments are invalid (a malformed id, content that is not a JSON object, ...).
    Invalid(String),
    /// The server refused it under its rules, with the Matrix error a client would have got.
    Refused(MatrixError),
    /// Anything else the host reported.
    Failed(String),
    /// JSON that could not be parsed into the expected type, or a value that could not be
    /// serialized (raised by the SDK's helpers, not by the host).
    Json(String),
}

impl Error {
    /// The WIT name of the case: `not-granted`, `not-allowed`, `invalid`, `refused`, `failed`,
    /// or `json` for the SDK's own JSON errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotGranted(_) => "not-granted",
            Error::NotAllowed(_) => "not-allowed",
            Error::Invalid(_) => "invalid",
            Error::Refused(_) => "refused",
            Error::Failed(_) => "failed",
            Error::Json(_) => "json",
        }
    }

    pub(crate) fn json(error: serde_json::Error) -> Self {
        Error::Json(error.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotGranted(detail)
            | Error::NotAllowed(detail)
            | Error::Invalid(detail)
            | Error::Failed(detail)
            | Error::Json(detail) => write!(f, "{}: {detail}", self.kind()),
            Error::Refused(e) => write!(f, "refused: {} {}: {}", e.status, e.errcode, e.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<HostError> for Error {
    fn from(error: HostError) -> Self {
        match error {
            HostError::NotGranted(detail) => Error::NotGranted(detail),
            HostError::NotAllowed(detail) => Error::NotAllowed(detail),
            HostError::Invalid(detail) => Error::Invalid(detail),
            HostError::Refused(e) => Error::Refused(e),
            HostError::Failed(detail) => Error::Failed(detail),
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::json(error)
    }
}

impl From<Error> for String {
    fn from(error: Error) -> Self {
        error.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_the_wit_case() {
        assert_eq!(Error::from(HostError::NotGranted("http".into())).to_string(), "not-granted: http");
        let refused = MatrixError { status: 403, errcode: "M_FORBIDDEN".into(), message: "no".into() };
        assert_eq!(Error::from(HostError::Refused(refused)).to_string(), "refused: 403 M_FORBIDDEN: no");
        let as_string: String = Error::Failed("x".into()).into();
        assert_eq!(as_string, "failed: x");
    }
}
