//! Starting and stopping the server. The socket is bound first and answers at once (health
//! says "loading"); the model loads in the blocking pool and the engine thread starts.
//! Shutdown drains: health turns 503 and new requests are refused while accepted ones
//! finish (up to the shutdown timeout), then the listener closes.

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

use super::pool::MediaPool;
use super::validate::RequestLimits;
use super::{ApiSettings, AppState, Ready, router};
use crate::config::ServeArgs;
use crate::engine::{EngineConfig, EngineHandle};
use crate::kv::KvSpec;
use crate::media::{FetchConfig, MediaFetcher, MediaLimits};
use crate::metrics::Metrics;
use crate::model::lora::{AdapterLimits, AdapterRegistry};

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

impl ServerHandle {
    /// Waits until the model is loaded; an error if loading failed.
    pub async fn ready(&self) -> anyhow::Result<()> {
        loop {
            if self.state.ready.get().is_some() {
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

/// Binds, starts loading the model, and serves until `shutdown`.
pub async fn start(args: ServeArgs) -> anyhow::Result<ServerHandle> {
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let metrics = Metrics::new();
    let fetcher = MediaFetcher::new(fetch_config(&args)).map_err(anyhow::Error::msg)?;
    let workers = args
        .media
        .media_workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pool = MediaPool::new(workers, args.media.media_inline);
    let state = Arc::new(AppState::new(api_settings(&args), metrics, fetcher, pool));
    set_grpc_health(&state, false).await;
    let loading = state.clone();
    let load_args = args.clone();
    tokio::spawn(async move {
        let metrics = loading.metrics.clone();
        let model = load_args.model.model.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&load_args, &metrics)).await;
        match loaded.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(ready) => {
                let _ = loading.ready.set(ready);
                if !loading.draining.load(Ordering::Acquire) {
                    set_grpc_health(&loading, true).await;
                }
                tracing::info!(%model, "model loaded; ready");
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "model failed to load");
                let _ = loading.load_error.set(format!("{err:#}"));
            }
        }
    });
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

/// `ocellus serve`: runs until SIGTERM or SIGINT, then drains and returns.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let server = start(args).await?;
    let signalled = tokio::select! {
        result = server.ready() => {
            result?;
            false
        }
        _ = shutdown_signal() => true,
    };
    if !signalled {
        shutdown_signal().await;
    }
    tracing::info!("shutting down: draining");
    server.shutdown();
    server.wait().await
}

async fn shutdown_signal() {
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
        limits: RequestLimits {
            max_n: limits.max_n,
            max_stop_sequences: limits.max_stop_sequences,
            max_top_logprobs: limits.max_top_logprobs,
            max_images_per_request: limits.max_images_per_request,
            max_videos_per_request: limits.max_videos_per_request,
            max_video_frames: limits.max_video_frames,
        },
        media: MediaLimits {
            max_image_pixels: limits.max_image_pixels,
            max_video_seconds: limits.max_video_seconds,
        },
        max_body_bytes: limits.max_body_size.as_u64() as usize,
        max_image_tokens_per_request: limits.max_image_tokens_per_request,
        request_timeout: args.request_timeout,
    }
}

fn fetch_config(args: &ServeArgs) -> FetchConfig {
    let media = &args.media;
    FetchConfig {
        timeout: media.media_fetch_timeout,
        max_redirects: media.max_media_redirects,
        max_bytes: args.limits.max_media_size.as_u64() as usize,
        allowed_domains: media
            .allowed_media_domains
            .iter()
            .map(|d| d.trim().to_ascii_lowercase())
            .collect(),
        allowed_local_path: media.allowed_local_media_path.clone(),
    }
}

fn served_model_name(args: &ServeArgs) -> String {
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

/// The adapters of `--lora`, read before the server reports ready: a broken one stops it.
fn load_adapters(args: &ServeArgs, loaded: &crate::LoadedModel) -> anyhow::Result<AdapterRegistry> {
    let adapters = &args.adapters;
    let limits = AdapterLimits {
        max_loras: adapters.max_loras,
        max_rank: adapters.max_lora_rank,
    };
    let model = &loaded.model;
    let registry = AdapterRegistry::new(
        &served_model_name(args),
        model.adapter_layout(),
        model.dtype(),
        model.device().clone(),
        limits,
    );
    for lora in &adapters.lora {
        let adapter = (registry.load(&lora.name, &lora.path)).with_context(|| format!("--lora {}", lora.name))?;
        tracing::info!(
            name = lora.name,
            rank = adapter.rank(),
            modules = adapter.modules(),
            "adapter loaded"
        );
    }
    Ok(registry)
}

fn load(args: &ServeArgs, metrics: &Arc<Metrics>) -> anyhow::Result<Ready> {
    anyhow::ensure!(
        args.max_batch_tokens > args.max_num_seqs,
        "--max-batch-tokens ({}) must exceed --max-num-seqs ({}): decodes take one token each and prompts need the rest",
        args.max_batch_tokens,
        args.max_num_seqs
    );
    let loaded = args.model.load()?;
    let adapters = load_adapters(args, &loaded)?;
    let info = loaded.model.info().clone();
    let spec: KvSpec = loaded.kv_spec();
    let max_model_len = args.max_model_len.unwrap_or(info.max_positions).min(info.max_positions);
    let blocks = args.kv_cache_memory.as_u64() as usize / spec.bytes_per_block();
    let capacity = blocks * crate::kv::BLOCK_TOKENS;
    anyhow::ensure!(
        capacity >= max_model_len,
        "--kv-cache-memory {} holds {capacity} tokens ({} bytes each), fewer than the maximum context length \
         {max_model_len}: raise --kv-cache-memory or lower --max-model-len",
        args.kv_cache_memory,
        spec.bytes_per_token()
    );
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs,
        max_batch_tokens: args.max_batch_tokens,
        max_model_len,
        vision_cache_bytes: args.vision_cache_memory.as_u64() as usize,
        prefix_caching: !args.no_prefix_caching,
    };
    let (processor, mut core) = loaded.into_engine(config, blocks)?;
    processor.set_preprocess_cache_bytes(args.preprocess_cache_memory.as_u64() as usize);
    if let Err(e) = warm_up(&processor, &mut core) {
        tracing::warn!(error = %e, "the warm-up request failed; serving anyway");
    }
    let (engine, _thread) = EngineHandle::spawn(core, args.max_queue, metrics.clone());
    Ok(Ready {
        engine,
        processor: Arc::new(processor),
        vocab_size: info.vocab_size,
        adapters: Arc::new(adapters),
    })
}

/// One small image request through the whole engine before the server reports ready: the
/// first vision encode and forward passes fault in their buffers and start the thread pools,
/// which made a fresh server's first photo request (detail low) take 1.27 s to its first token
/// against 0.08 s for the next. vLLM likewise runs the model once at startup.
fn warm_up(processor: &crate::processor::Processor, core: &mut crate::engine::EngineCore) -> anyhow::Result<()> {
    let started = Instant::now();
    let messages = [crate::processor::ChatMessage {
        role: "user".into(),
        content: vec![
            crate::processor::ContentPart::Image,
            crate::processor::ContentPart::Text {
                text: "Warm up.".into(),
            },
        ],
    }];
    let image = crate::processor::ImageInput {
        image: image::DynamicImage::new_rgb8(64, 64),
        split: Some(false),
    };
    let prompt = processor.process(&messages, &[image])?;
    let request = crate::engine::GenerationRequest::greedy(prompt, 2);
    crate::engine::generate(core, vec![request], |_| {})?;
    tracing::info!(took = ?started.elapsed(), "warmed up");
    Ok(())
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
