//! Operator authentication: Argon2id passwords, HS256 tokens, roles.
//!
//! The token proves who the caller is; the role is read from Postgres on every request,
//! so disabling an account or changing its role takes effect at once. The admin API is
//! not on the hot path, and one indexed lookup is cheap next to that guarantee.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use hyper::header::AUTHORIZATION;
use hyper::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Operator,
    Auditor,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
        }
    }

    pub fn may(self, need: Need) -> bool {
        match need {
            Need::Read => true,
            Need::Write => matches!(self, Role::Admin | Role::Operator),
            Need::ManageAdmins | Need::Credit | Need::CloseRebates => self == Role::Admin,
            Need::ReadAudit => matches!(self, Role::Admin | Role::Auditor),
        }
    }
}

/// What a route needs of the caller's role.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    /// Catalogue, stock, resellers, orders: read.
    Read,
    /// Catalogue, stock, resellers, orders, balances: change.
    Write,
    /// Operator accounts.
    ManageAdmins,
    /// Closing a month's rebates: money to every reseller at once, for good.
    CloseRebates,
    /// The audit log.
    ReadAudit,
    /// Credit lines (docs/api.md §6): lending the platform's money, admin only.
    Credit,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub username: String,
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
}

/// Seconds a token is still accepted past its expiry, for clocks a little apart.
const TOKEN_LEEWAY_SECS: u64 = 5;

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        // Only HS256: a token naming another algorithm (`none` included) is refused.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = TOKEN_LEEWAY_SECS;
        // Expiry is judged in `verify` against the gateway's clock (`crate::clock`), not
        // the library's own reading of the system time.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for `username` issued at `iat` (Unix seconds), and its expiry.
    pub fn issue(&self, username: &str, iat: u64) -> Result<(String, u64), ApiError> {
        let exp = iat + self.ttl.as_secs();
        let claims = Claims {
            sub: username.to_string(),
            iat,
            exp,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(ApiError::internal)?;
        Ok((token, exp))
    }

    /// The claims of `token` if it is ours and has not expired at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, ApiError> {
        let refused = || ApiError::Unauthenticated("missing, expired or invalid token");
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|_| refused())?;
        let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
        if exp.saturating_add(TOKEN_LEEWAY_SECS as i64) < now {
            return Err(refused());
        }
        Ok(claims)
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        })
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthenticated("missing bearer token"))
}

/// Argon2id work, CPU-heavy and about 19 MiB a call, bounded apart from everything else
/// (docs/invariants.md invariant 9): at most `concurrency` at once on the blocking pool, and a
/// caller that cannot get a turn within `wait` is refused `503 overloaded` rather than
/// queued, so a flood of logins neither starves the order path of CPU nor piles up.
pub struct Passwords {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl Passwords {
    pub fn new(concurrency: usize, wait: Duration) -> Self {
        Passwords {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            wait,
        }
    }

    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.run(move || hash_password(&password)).await?
    }

    /// See [`verify_password`].
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        self.run(move || verify_password(&password, stored.as_deref())).await
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                metrics::counter!("cardgate_password_hash_refused_total").increment(1);
                ApiError::Overloaded { retry_after_secs: 1 }
            })?
            .map_err(ApiError::internal)?;
        // The permit moves into the blocking task: if the client goes away, the work still
        // runs to its end and holds its turn until then.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(ApiError::internal)
    }
}

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(anyhow::anyhow!("hashing a password: {e}")))
}

/// Verifies `password` against a stored PHC string. With no stored hash (unknown user)
/// it verifies against a fixed dummy hash, so both cases cost the same time.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("cardgate-dummy-password").unwrap_or_default());
    let hash = stored.unwrap_or(dummy);
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let ok = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
    ok && stored.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_may_what_the_contract_says() {
        assert!(
            Role::Admin.may(Need::ManageAdmins) && Role::Admin.may(Need::Write) && Role::Admin.may(Need::ReadAudit)
        );
        assert!(Role::Operator.may(Need::Write) && !Role::Operator.may(Need::ManageAdmins));
        assert!(Role::Admin.may(Need::CloseRebates));
        assert!(!Role::Operator.may(Need::CloseRebates) && !Role::Auditor.may(Need::CloseRebates));
        assert!(Role::Auditor.may(Need::Read) && !Role::Auditor.may(Need::Write) && Role::Auditor.may(Need::ReadAudit));
    }

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", Some(&h)));
        assert!(!verify_password("wrong", Some(&h)));
        assert!(!verify_password("cardgate-dummy-password", None));
    }

    #[test]
    fn tokens_verify_only_with_their_secret_and_before_expiry() {
        const IAT: u64 = 1_700_000_000;
        let now = IAT as i64;
        let t = Tokens::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(60));
        let (token, exp) = t.issue("alice", IAT).unwrap();
        assert_eq!(exp, IAT + 60);
        assert_eq!(t.verify(&token, now).unwrap().sub, "alice");
        let other = Tokens::new(b"fedcba9876543210fedcba9876543210", Duration::from_secs(60));
        assert!(other.verify(&token, now).is_err());
        let leeway = TOKEN_LEEWAY_SECS as i64;
        assert!(t.verify(&token, now + 60 + leeway).is_ok(), "within the leeway");
        assert!(t.verify(&token, now + 60 + leeway + 1).is_err(), "expired");
        let claims = Claims {
            sub: "alice".into(),
            iat: 1,
            exp: 2,
        };
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.encoding).unwrap();
        assert!(t.verify(&old, now).is_err());
    }
}

#[cfg(test)]
mod passwords {
    use super::*;

    #[tokio::test]
    async fn a_caller_without_a_turn_in_time_is_refused_overloaded() {
        let p = Passwords::new(1, Duration::from_millis(10));
        let held = p.permits.clone().acquire_owned().await.unwrap();
        let e = p.verify("password".into(), None).await.unwrap_err();
        assert_eq!((e.code(), e.retry_after_secs()), ("overloaded", Some(1)));
        drop(held);
        assert!(!p.verify("password".into(), None).await.unwrap());
    }
}
