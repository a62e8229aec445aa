//! Bearer-token authentication and roles.
//!
//! Tokens look like `farm_<64 hex>`; only their SHA-256 is stored. A short in-process cache keeps the
//! lookup off the hot path; revocations take effect within its time to live ([`CACHE_TTL`] by
//! default, `--auth-cache-ms`), for new calls and for open worker sessions (checked on heartbeats).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};

/// Default time to live of a cached token lookup.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Worker,
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "worker" => Some(Role::Worker),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
    pub role: Role,
}

impl Principal {
    /// Clients and admins use the job API.
    pub fn require_client(&self) -> Result<()> {
        match self.role {
            Role::Client | Role::Admin => Ok(()),
            Role::Worker => Err(Error::PermissionDenied("worker tokens cannot use the job API".into())),
        }
    }
    /// Workers and admins use the worker API.
    pub fn require_worker(&self) -> Result<()> {
        match self.role {
            Role::Worker | Role::Admin => Ok(()),
            Role::Client => Err(Error::PermissionDenied("client tokens cannot use the worker API".into())),
        }
    }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("farm_{}", hex::encode(bytes))
}

pub struct Authenticator {
    pool: PgPool,
    cache: Mutex<HashMap<String, (Option<Principal>, Instant)>>,
    cache_ttl: Duration,
}

impl Authenticator {
    pub fn new(pool: PgPool, cache_ttl: Duration) -> Self {
        Authenticator { pool, cache: Mutex::new(HashMap::new()), cache_ttl }
    }

    /// Reads `authorization: Bearer <token>` and resolves it.
    pub async fn authenticate(&self, md: &MetadataMap) -> Result<Principal> {
        let header = md
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing bearer token (authorization metadata)".into()))?;
        let value = header
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed authorization metadata".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Error::Unauthenticated("authorization must be 'Bearer <token>'".into()))?
            .trim();
        let hash = hash_token(token);
        if let Some((p, at)) = self.cache.lock().unwrap().get(&hash).cloned() {
            if at.elapsed() < self.cache_ttl {
                return p.ok_or_else(|| Error::Unauthenticated("unknown or revoked token".into()));
            }
        }
        let row: Option<(String, String)> = sqlx::query_as(
            "select tenant_id, role from api_tokens where token_sha256 = $1 and revoked_at is null",
        )
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let p = row.and_then(|(tenant, role)| Role::parse(&role).map(|role| Principal { tenant, role }));
        let mut cache = self.cache.lock().unwrap();
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(hash, (p.clone(), Instant::now()));
        p.ok_or_else(|| Error::Unauthenticated("unknown or revoked token".into()))
    }
}

/// Creates a tenant (if new) and a token for it; returns the token, shown only this once.
pub async fn create_token(pool: &PgPool, tenant: &str, role: Role, label: &str) -> Result<String> {
    if tenant.is_empty() || tenant.len() > 128 {
        return Err(Error::InvalidArgument("tenant must be 1 to 128 bytes".into()));
    }
    let token = new_token();
    let mut tx = pool.begin().await?;
    sqlx::query("insert into tenants (id) values ($1) on conflict do nothing").bind(tenant).execute(&mut *tx).await?;
    sqlx::query("insert into api_tokens (token_sha256, tenant_id, role, label) values ($1, $2, $3, $4)")
        .bind(hash_token(&token))
        .bind(tenant)
        .bind(role.as_str())
        .bind(label)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(token)
}

/// Characters of a token's SHA-256 shown as its id (`token list`) and enough to revoke it.
pub const TOKEN_ID_LEN: usize = 12;

/// A stored token as `token list` shows it (never the token itself).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    /// The first [`TOKEN_ID_LEN`] hex digits of the token's SHA-256.
    pub id: String,
    pub tenant: String,
    pub role: String,
    pub label: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

type TokenRow = (String, String, String, String, chrono::DateTime<chrono::Utc>, Option<chrono::DateTime<chrono::Utc>>);

fn token_info((sha, tenant, role, label, created_at, revoked_at): TokenRow) -> TokenInfo {
    TokenInfo { id: sha[..TOKEN_ID_LEN.min(sha.len())].to_string(), tenant, role, label, created_at, revoked_at }
}

/// Every token, or those of `tenant`, oldest first.
pub async fn list_tokens(pool: &PgPool, tenant: Option<&str>) -> Result<Vec<TokenInfo>> {
    let rows: Vec<TokenRow> = sqlx::query_as(
        "select token_sha256, tenant_id, role, label, created_at, revoked_at from api_tokens
         where $1::text is null or tenant_id = $1 order by created_at, token_sha256",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(token_info).collect())
}

/// Revokes the token named by `token_or_id`: the token itself (`farm_...`) or at least 8 leading
/// hex digits of its SHA-256 (the id `token list` shows). Revoking a revoked token changes nothing.
/// Replicas refuse it within their cache's time to live ([`CACHE_TTL`] by default).
pub async fn revoke_token(pool: &PgPool, token_or_id: &str) -> Result<TokenInfo> {
    let given = token_or_id.trim();
    let prefix = if given.starts_with("farm_") {
        hash_token(given)
    } else if given.len() >= 8 && given.chars().all(|c| c.is_ascii_hexdigit()) {
        given.to_ascii_lowercase()
    } else {
        return Err(Error::InvalidArgument(
            "name the token itself (farm_...) or at least 8 hex digits of its id (see `token list`)".into(),
        ));
    };
    let mut tx = pool.begin().await?;
    let matches: Vec<String> =
        sqlx::query_scalar("select token_sha256 from api_tokens where starts_with(token_sha256, $1) limit 2 for update")
            .bind(&prefix)
            .fetch_all(&mut *tx)
            .await?;
    let sha = match matches.as_slice() {
        [one] => one.clone(),
        [] => return Err(Error::NotFound(format!("no token with id {given}"))),
        _ => return Err(Error::InvalidArgument(format!("id {given} names more than one token; give more digits"))),
    };
    let row: TokenRow = sqlx::query_as(
        "update api_tokens set revoked_at = coalesce(revoked_at, now()) where token_sha256 = $1
         returning token_sha256, tenant_id, role, label, created_at, revoked_at",
    )
    .bind(&sha)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(token_info(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("farm_") && a.len() == 69);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[test]
    fn roles() {
        let c = Principal { tenant: "t".into(), role: Role::Client };
        let w = Principal { tenant: "t".into(), role: Role::Worker };
        assert!(c.require_client().is_ok() && c.require_worker().is_err());
        assert!(w.require_worker().is_ok() && w.require_client().is_err());
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }
}
