//! Starting and stopping the server. The socket is bound first and answers at once (health
//! says "loading") while the model loads (`runtime::start` loads it and hands the engine
//! over with `mark_ready`). Shutdown drains: health turns 503 and new requests are refused
//! while accepted ones finish (up to the shutdown timeout), then the listener closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::{ApiSettings, AppState, Ready, router};
use crate::config::ServeArgs;
use crate::metrics::Metrics;
use crate::openai;

/// A running server.
pub struct ServerHandle {
    pub addr: SocketAddr,
    /// The gRPC API's address, when `--grpc-port` is set.
    pub grpc_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: Arc<Notify>,
    task: JoinHandle<anyhow::Result<()>>,
    grpc_task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The model is loaded: requests are taken from now on.
pub async fn mark_ready(state: &AppState, ready: Ready) {
    let _ = state.ready.set(ready);
    if !state.draining.load(Ordering::Acquire) {
        set_grpc_health(state, true).await;
    }
}

/// The contrastive model is loaded: requests are taken from now on.
pub async fn mark_embed_ready(state: &AppState, ready: super::EmbedReady) {
    let _ = state.embed.set(ready);
    if !state.draining.load(Ordering::Acquire) {
        set_grpc_health(state, true).await;
    }
}

/// The model failed to load: health says so (and `ServerHandle::ready` returns the error).
pub fn mark_failed(state: &AppState, error: String) {
    let _ = state.load_error.set(error);
}

impl ServerHandle {
    /// Waits until the model is loaded; an error if loading failed.
    pub async fn ready(&self) -> anyhow::Result<()> {
        loop {
            if self.state.ready.get().is_some() || self.state.embed.get().is_some() {
                return Ok(());
            }
            if let Some(error) = self.state.load_error.get() {
                anyhow::bail!("{error}");
            }
            // Loading takes from milliseconds to minutes; there is no event to wait on
            // across the blocking pool, so look again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts draining (as SIGTERM does); `wait` returns once it is done.
    pub fn shutdown(&self) {
        self.shutdown.notify_one();
    }

    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task")??;
        if let Some(grpc) = self.grpc_task {
            grpc.await.context("gRPC server task")??;
        }
        Ok(())
    }
}

/// Binds and serves until `shutdown`; requests get 503 until `mark_ready`.
pub async fn start(args: &ServeArgs) -> anyhow::Result<ServerHandle> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(api_settings(args), Metrics::new()));
    set_grpc_health(&state, false).await;
    let app = router(state.clone())
        .layer(TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path())
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(cors(&args.cors_allow_origin));
    let shutdown = Arc::new(Notify::new());
    let (drained_tx, drained_rx) = tokio::sync::watch::channel(false);
    let drained = {
        let (state, shutdown, timeout) = (state.clone(), shutdown.clone(), args.shutdown_timeout);
        async move {
            shutdown.notified().await;
            drain(&state, timeout).await;
            let _ = drained_tx.send(true);
        }
    };
    let (grpc_addr, grpc_task) = match args.grpc_port {
        Some(port) => {
            let (addr, task) = start_grpc(&args.host, port, state.clone(), drained_rx).await?;
            (Some(addr), Some(task))
        }
        None => (None, None),
    };
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(drained)
            .await
            .context("serving")
    });
    tracing::info!(%addr, "listening");
    Ok(ServerHandle {
        addr,
        grpc_addr,
        state,
        shutdown,
        task,
        grpc_task,
    })
}

/// The gRPC server: the Ocellus service, grpc.health.v1 and reflection. It stops once the
/// HTTP side has drained (the engine is shared, and so is the drain).
async fn start_grpc(
    host: &str,
    port: u16,
    state: Arc<AppState>,
    mut drained: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening for gRPC on {host}:{port}"))?;
    let addr = listener.local_addr()?;
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(state.grpc_health.clone()),
    );
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(super::grpc::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(super::grpc::service(state))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = drained.wait_for(|done| *done).await;
            })
            .await
            .context("serving gRPC")
    });
    tracing::info!(%addr, "gRPC listening");
    Ok((addr, task))
}

/// grpc.health.v1: the whole server ("") and the Ocellus service alike.
async fn set_grpc_health(state: &AppState, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    for service in ["", "ocellus.v1.Ocellus"] {
        state.grpc_health.set_service_status(service, status).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed. This is a bug.");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

async fn drain(state: &AppState, timeout: Duration) {
    state.draining.store(true, Ordering::Release);
    set_grpc_health(state, false).await;
    if let Some(embed) = state.embed.get() {
        // Embedding requests take a batch or two: answer what waits, then stop.
        embed.engine.shutdown();
        while !embed.engine.is_stopped() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let Some(ready) = state.ready.get() else { return };
    let deadline = Instant::now() + timeout;
    ready.engine.shutdown(deadline);
    // The engine thread finishes accepted work, or fails it at the deadline, then stops.
    while !ready.engine.is_stopped() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn api_settings(args: &ServeArgs) -> ApiSettings {
    let limits = &args.limits;
    ApiSettings {
        served_model_name: served_model_name(args),
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        limits: openai::Limits {
            max_n: limits.max_n,
            max_stop_sequences: limits.max_stop_sequences,
            max_top_logprobs: limits.max_top_logprobs,
            max_images_per_request: limits.max_images_per_request,
            max_videos_per_request: limits.max_videos_per_request,
            max_video_frames: limits.max_video_frames,
            max_image_budget_pixels: limits.max_pixels_per_image,
            max_embedding_inputs: limits.max_embedding_inputs,
            max_schema_depth: limits.max_schema_depth,
        },
        max_body_bytes: limits.max_body_size.as_u64() as usize,
        request_timeout: args.request_timeout,
        web_ui: !args.no_web_ui,
    }
}

/// The name clients give as `model`.
pub fn served_model_name(args: &ServeArgs) -> String {
    (args.served_model_name.clone()).unwrap_or_else(|| default_model_name(&args.model.model))
}

/// A hub id as given; a local folder by its own name (`tiny-idefics3`, not its full path).
fn default_model_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    match path.file_name() {
        Some(name) if path.is_dir() => name.to_string_lossy().into_owned(),
        _ => model.to_string(),
    }
}

fn cors(origins: &[String]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let layer = CorsLayer::new().allow_methods(Any).allow_headers(Any);
    if origins.iter().any(|o| o == "*") {
        return layer.allow_origin(Any);
    }
    let list = origins.iter().filter_map(|o| o.parse().ok()).collect::<Vec<_>>();
    layer.allow_origin(AllowOrigin::list(list))
}
