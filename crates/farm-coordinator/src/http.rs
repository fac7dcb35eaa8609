//! The coordinator's HTTP side: health, readiness, Prometheus metrics and the dashboard.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::dashboard::{self, Dashboard};
use crate::Shared;

pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dashboard = Arc::new(Dashboard {
        shared: shared.clone(),
        auth: crate::auth::Authenticator::default(),
        live: dashboard::Live::default(),
        shutdown: shutdown.clone(),
    });
    let tracker = tokio::spawn(dashboard::track(dashboard.clone()));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .merge(dashboard::routes(dashboard));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    let _ = tracker.await;
    served?;
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

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match shared.metrics.render(&shared).await {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("# {e}\n")).into_response(),
    }
}
