//! Bearer-token authentication. Every RPC but health (and reflection) names its caller; a
//! tenant sees only its own jobs, an admin sees everything and the cluster.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Request, Status};

use crate::store::{Store, StoreError};

/// How long a verified token is trusted without asking Postgres again.
const CACHE_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
}

impl Caller {
    /// The tenant whose jobs this caller may see; `None` for an admin (all of them).
    pub fn scope(&self) -> Option<&str> {
        (!self.admin).then_some(self.tenant.as_str())
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        if self.admin {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this needs an admin token (farm token create --tenant NAME --admin)",
            ))
        }
    }
}

#[derive(Default)]
pub struct Authenticator {
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl Authenticator {
    pub async fn caller<T>(&self, store: &Store, request: &Request<T>) -> Result<Caller, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?;
        self.caller_token(store, token).await
    }

    /// The caller holding `token` (the dashboard reads it from its cookie).
    pub async fn caller_token(&self, store: &Store, token: &str) -> Result<Caller, Status> {
        let key = crate::store::token_digest(token);
        if let Ok(cache) = self.cache.lock() {
            if let Some((caller, at)) = cache.get(&key) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(caller.clone());
                }
            }
        }
        let owner = store.token_owner(token).await.map_err(|e: StoreError| {
            if e.is_unavailable() {
                Status::unavailable(format!("database unavailable: {e}"))
            } else {
                Status::internal(e.to_string())
            }
        })?;
        let (tenant, admin) =
            owner.ok_or_else(|| Status::unauthenticated("unknown or revoked token"))?;
        let caller = Caller { tenant, admin };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(key, (caller.clone(), Instant::now()));
        }
        Ok(caller)
    }
}
