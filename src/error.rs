//! The one error type of the HTTP surface and its one mapping to docs/api.md §2.
//!
//! Client faults carry a message meant for the client. Server faults carry their cause
//! for the log only: the client sees an opaque message and the request id.

use std::borrow::Cow;

use hyper::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(Cow<'static, str>),
    #[error("missing or malformed Authorization header")]
    MissingAuthorization,
    #[error("timestamp outside the allowed window")]
    TimestampOutOfWindow,
    #[error("invalid signature")]
    InvalidSignature,
    #[error("nonce already used")]
    NonceReused,
    #[error("address not allowed")]
    IpNotAllowed,
    #[error("account suspended")]
    AccountSuspended,
    /// Names the scope the call needs.
    #[error("this API key does not have the scope {0}")]
    InsufficientScope(&'static str),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("this role may not do that")]
    Forbidden,
    #[error("insufficient balance")]
    InsufficientBalance,
    #[error("the order would pass a daily spend limit")]
    SpendLimitExceeded,
    #[error("orders are held by risk control until an operator releases them")]
    RiskHold,
    #[error("{0}")]
    NotFound(Cow<'static, str>),
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("{0}")]
    Conflict(Cow<'static, str>),
    #[error("not enough stock")]
    OutOfStock,
    /// The message names the key and what differs: a merchant_order_no, a reference.
    #[error("{0}")]
    IdempotencyConflict(&'static str),
    #[error("the current unit price is above max_unit_price")]
    PriceChanged,
    #[error("an order with this merchant_order_no is still being processed")]
    OrderInProgress,
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("request line and headers are larger than {max} bytes")]
    HeadersTooLarge { max: usize },
    #[error("request body was not received in time")]
    SlowBody,
    #[error("{0}")]
    UnsupportedMediaType(&'static str),
    #[error("{0}")]
    QuantityOutOfRange(Cow<'static, str>),
    #[error("product is not on sale")]
    ProductUnavailable,
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("overloaded, retry later")]
    Overloaded { retry_after_secs: u64 },
    #[error("{what} unavailable, retry later")]
    Unavailable { what: &'static str, retry_after_secs: u64 },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        ApiError::InvalidRequest(msg.into())
    }

    pub fn not_found(what: impl Into<Cow<'static, str>>) -> Self {
        ApiError::NotFound(what.into())
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidRequest(_) | SlowBody => StatusCode::BAD_REQUEST,
            MissingAuthorization | TimestampOutOfWindow | InvalidSignature | NonceReused | Unauthenticated(_) => {
                StatusCode::UNAUTHORIZED
            }
            IpNotAllowed | AccountSuspended | InsufficientScope(_) | Forbidden | RiskHold => StatusCode::FORBIDDEN,
            InsufficientBalance | SpendLimitExceeded => StatusCode::PAYMENT_REQUIRED,
            NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Conflict(_) | OutOfStock | IdempotencyConflict(_) | PriceChanged | OrderInProgress => StatusCode::CONFLICT,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            QuantityOutOfRange(_) | ProductUnavailable => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Overloaded { .. } | Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidRequest(_) | SlowBody | HeadersTooLarge { .. } => "invalid_request",
            MissingAuthorization => "missing_authorization",
            TimestampOutOfWindow => "timestamp_out_of_window",
            InvalidSignature => "invalid_signature",
            NonceReused => "nonce_reused",
            IpNotAllowed => "ip_not_allowed",
            AccountSuspended => "account_suspended",
            InsufficientScope(_) => "insufficient_scope",
            Unauthenticated(_) => "unauthenticated",
            Forbidden => "forbidden",
            InsufficientBalance => "insufficient_balance",
            SpendLimitExceeded => "spend_limit_exceeded",
            RiskHold => "risk_hold",
            NotFound(_) => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            Conflict(_) => "conflict",
            OutOfStock => "out_of_stock",
            IdempotencyConflict(_) => "idempotency_conflict",
            PriceChanged => "price_changed",
            OrderInProgress => "order_in_progress",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType(_) => "unsupported_media_type",
            QuantityOutOfRange(_) => "quantity_out_of_range",
            ProductUnavailable => "product_unavailable",
            RateLimited { .. } => "rate_limited",
            Overloaded { .. } => "overloaded",
            Unavailable { .. } => "unavailable",
            Internal(_) => "internal_error",
        }
    }

    /// Seconds for the `Retry-After` header, where the answer invites a retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs }
            | ApiError::Overloaded { retry_after_secs }
            | ApiError::Unavailable { retry_after_secs, .. } => Some((*retry_after_secs).max(1)),
            ApiError::OrderInProgress => Some(1),
            _ => None,
        }
    }

    /// Whether the connection must be closed after answering: the rest of the request
    /// body was not read, so the stream is no longer at a request boundary.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::PayloadTooLarge | ApiError::SlowBody | ApiError::HeadersTooLarge { .. }
        )
    }

    /// The message shown to the client. Server faults never show their cause.
    pub fn client_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        // A lost connection, a server shutting down or a statement timeout is Postgres
        // being away or slow, not a bug: the client may retry.
        let away = e.is_closed()
            || e.code().is_some_and(|c| {
                let c = c.code();
                c.starts_with("08") || c.starts_with("57") || c == "53300"
            })
            || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
        if away {
            tracing::warn!(error = %e, "postgres unavailable");
            return ApiError::Unavailable {
                what: "database",
                retry_after_secs: 1,
            };
        }
        ApiError::Internal(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Timeout(_) | deadpool_postgres::PoolError::Backend(_) => {
                tracing::warn!(error = %e, "postgres unavailable");
                ApiError::Unavailable {
                    what: "database",
                    retry_after_secs: 1,
                }
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::redis(&e)
    }
}

impl ApiError {
    /// An error from work spanning both stores: mapped as its store's own error would be
    /// (`unavailable` while one is out of reach), otherwise internal.
    pub fn store(e: anyhow::Error) -> Self {
        let e = match e.downcast::<redis::RedisError>() {
            Ok(r) => return ApiError::redis(&r),
            Err(e) => e,
        };
        let e = match e.downcast::<tokio_postgres::Error>() {
            Ok(p) => return p.into(),
            Err(e) => e,
        };
        match e.downcast::<deadpool_postgres::PoolError>() {
            Ok(p) => p.into(),
            Err(e) => ApiError::Internal(e),
        }
    }

    /// A Redis failure: `unavailable` while Redis cannot be reached, otherwise internal.
    /// On a cluster, a slot without a primary (a failover under way), a node still loading or
    /// one just demoted is the same: the client's retries ran out before the cluster settled.
    pub fn redis(e: &redis::RedisError) -> Self {
        use redis::{ErrorKind, ServerErrorKind};
        let settling = e.is_cluster_error()
            || matches!(
                e.kind(),
                ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::Server(
                        ServerErrorKind::MasterDown | ServerErrorKind::ReadOnly | ServerErrorKind::BusyLoading
                    )
            );
        if settling || e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
            tracing::warn!(error = %e, "redis unavailable");
            ApiError::Unavailable {
                what: "redis",
                retry_after_secs: 1,
            }
        } else {
            ApiError::Internal(anyhow::anyhow!("redis: {e}"))
        }
    }
}
