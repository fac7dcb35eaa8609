//! Webhooks: when a job with a `webhook_url` ends, the coordinator POSTs the job as JSON to it.
//!
//! Deliveries live in Postgres (`webhook_deliveries`), one per job end, so they survive restarts
//! and several coordinators share them (each attempt is claimed with `SKIP LOCKED`). A 2xx
//! answer delivers; anything else (or no answer in 10 s) is retried with exponential backoff
//! (1 s, 2 s, 4 s, ... at most an hour apart) up to [`MAX_ATTEMPTS`] times.
//!
//! Each request carries:
//! - `x-farm-event: job.finished`, `x-farm-delivery: <uuid>` (the same for every retry of one
//!   delivery, so a receiver can drop duplicates),
//! - `x-farm-timestamp: <unix seconds>`,
//! - with `--webhook-secret` (FARM_WEBHOOK_SECRET): `x-farm-signature: sha256=<hex>`, the
//!   HMAC-SHA256 under the secret of `<timestamp>.<body>`. A receiver recomputes it over the raw
//!   body, compares in constant time, and rejects old timestamps.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::store::WebhookDelivery;
use crate::Shared;

pub const MAX_ATTEMPTS: u32 = 10;
const POLL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(10);
/// A claimed attempt is not retried by anyone before this (it is in flight).
const CLAIM_LEASE: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// The most tasks a webhook body lists (`tasks_truncated` says when there were more).
const MAX_TASKS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
}

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// How long to wait after failed attempt number `attempts` (1-based).
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    FIRST_RETRY.saturating_mul(1u32 << exp).min(MAX_RETRY)
}

pub(crate) async fn deliverer(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("farm-coordinator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(WebhookError::from)?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(POLL) => {}
        }
        if let Err(e) = shared.store.enqueue_webhooks().await {
            tracing::warn!(error = %e, "could not look for ended jobs with webhooks");
            continue;
        }
        let due = match shared.store.claim_webhooks(32, CLAIM_LEASE).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim webhook deliveries");
                continue;
            }
        };
        let calls = due.into_iter().map(|d| deliver(&shared, &client, d));
        futures::future::join_all(calls).await;
    }
}

/// One attempt of one delivery, its outcome recorded.
async fn deliver(shared: &Shared, client: &reqwest::Client, d: WebhookDelivery) {
    let span = tracing::info_span!("webhook", job = %d.job, delivery = %d.id, attempt = d.attempts);
    let _enter = span.enter();
    let outcome = attempt(shared, client, &d).await;
    let (delivered, status, error) = match outcome {
        Ok(status) if (200..300).contains(&status) => (true, Some(status), None),
        Ok(status) => (false, Some(status), Some(format!("answered HTTP {status}"))),
        Err(e) => (false, None, Some(e)),
    };
    let retry_in = (!delivered && d.attempts < MAX_ATTEMPTS).then(|| backoff(d.attempts));
    if delivered {
        shared.metrics.webhook("delivered");
        tracing::info!(url = %d.url, status = ?status, "webhook delivered");
    } else if let Some(wait) = retry_in {
        shared.metrics.webhook("retry");
        tracing::warn!(url = %d.url, error = ?error, retry_in = ?wait, "webhook failed; will retry");
    } else {
        shared.metrics.webhook("failed");
        tracing::error!(url = %d.url, error = ?error, "webhook failed; giving up");
    }
    if let Err(e) = shared
        .store
        .finish_webhook(d.id, delivered, status, error.as_deref(), retry_in)
        .await
    {
        // The claim lease brings it back.
        tracing::warn!(error = %e, "could not record the webhook outcome");
    }
}

/// POSTs the job; the HTTP status, or why there was none.
async fn attempt(
    shared: &Shared,
    client: &reqwest::Client,
    d: &WebhookDelivery,
) -> Result<u16, String> {
    let job = shared
        .store
        .job(d.job)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the job no longer exists".to_string())?;
    let tasks = shared.store.tasks(d.job).await.map_err(|e| e.to_string())?;
    let now = chrono::Utc::now();
    let body = json!({
        "event": "job.finished",
        "delivery": d.id.to_string(),
        "attempt": d.attempts,
        "sent_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "job": crate::dashboard::job_json(&job, Some(&tasks), MAX_TASKS),
    });
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let timestamp = now.timestamp();
    let mut request = client
        .post(&d.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("x-farm-event", "job.finished")
        .header("x-farm-delivery", d.id.to_string())
        .header("x-farm-timestamp", timestamp.to_string());
    if let Some(secret) = shared.config.webhook_secret.as_deref() {
        request = request.header("x-farm-signature", signature(secret, timestamp, &body));
    }
    let response = request.body(body).send().await.map_err(|e| {
        // reqwest's Display hides the cause (connection refused, timeout).
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        message
    })?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac Jefe
        let sig = signature("Jefe", 1700000000, b"{\"a\":1}");
        assert_eq!(
            sig,
            "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
        assert_ne!(sig, signature("Jefe", 1700000001, b"{\"a\":1}"));
        assert_ne!(sig, signature("other", 1700000000, b"{\"a\":1}"));
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), Duration::from_secs(3600));
    }
}
