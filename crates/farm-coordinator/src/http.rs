//! The coordinator's HTTP side: health, readiness and Prometheus metrics.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    if let Err(e) = shared.store.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("postgres: {e}\n"));
    }
    if let Err(e) = shared.queue.ping().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}\n"));
    }
    (StatusCode::OK, "ready\n".into())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let counts = match shared.store.task_counts().await {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("# postgres: {e}\n"),
            )
        }
    };
    let workers = shared.store.workers().await.unwrap_or_default();
    let mut out = String::new();
    out.push_str("# HELP farm_tasks Tasks by state.\n# TYPE farm_tasks gauge\n");
    for (state, n) in [
        ("pending", counts.pending),
        ("queued", counts.queued),
        ("running", counts.running),
        ("succeeded", counts.succeeded),
        ("failed", counts.failed),
        ("cancelled", counts.cancelled),
    ] {
        let _ = writeln!(out, "farm_tasks{{state=\"{state}\"}} {n}");
    }
    let online = workers.iter().filter(|w| w.online).count();
    let _ = writeln!(
        out,
        "# HELP farm_workers_online Workers with a recent heartbeat.\n# TYPE farm_workers_online gauge\nfarm_workers_online {online}"
    );
    (StatusCode::OK, out)
}
