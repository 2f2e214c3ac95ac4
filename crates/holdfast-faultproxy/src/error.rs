use std::io;

/// Everything that can go wrong when controlling the proxy. Messages follow Toxiproxy's
/// (`"proxy not found"`, `"missing required field"`, …) with the detail after a colon, and the
/// HTTP API sends them as `{"error": <message>, "status": <status>}`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("proxy not found: {0}")]
    ProxyNotFound(String),
    #[error("proxy already exists: {0}")]
    ProxyExists(String),
    #[error("toxic not found: {toxic}")]
    ToxicNotFound { proxy: String, toxic: String },
    #[error("toxic already exists: {toxic}")]
    ToxicExists { proxy: String, toxic: String },
    #[error("invalid toxic type: {0:?}")]
    InvalidToxicType(String),
    #[error("stream was invalid, can be either upstream or downstream: {0:?}")]
    InvalidStream(String),
    #[error("missing required field: {0}")]
    MissingField(&'static str),
    /// The request could not be parsed or holds a value out of range.
    #[error("bad request body: {0}")]
    BadRequest(String),
    /// The proxy's `listen` address could not be bound.
    #[error("cannot listen on {listen}: {error}")]
    Listen { listen: String, error: io::Error },
}

impl Error {
    /// The HTTP status Toxiproxy answers with for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::ProxyNotFound(_) | Error::ToxicNotFound { .. } => 404,
            Error::ProxyExists(_) | Error::ToxicExists { .. } => 409,
            Error::InvalidToxicType(_)
            | Error::InvalidStream(_)
            | Error::MissingField(_)
            | Error::BadRequest(_) => 400,
            Error::Listen { .. } => 500,
        }
    }

    /// The named proxy or toxic does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == 404
    }

    /// A proxy or toxic with that name already exists.
    pub fn is_conflict(&self) -> bool {
        self.status() == 409
    }

    /// The request itself was wrong (unknown toxic type, bad stream, missing field, bad value).
    pub fn is_invalid(&self) -> bool {
        self.status() == 400
    }

    /// The listen address could not be bound (in use, not local, …).
    pub fn is_listen(&self) -> bool {
        matches!(self, Error::Listen { .. })
    }
}
