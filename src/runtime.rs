//! The composition root: the one place that puts the layers together. It loads a model
//! (the architecture registry picks its family) and its processor, sizes the KV pool
//! (`KvBudget`, one formula), builds the engine and warms it up; `serve`, `generate`,
//! `evaluate`, the tests and the benchmarks all start here.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};

use crate::api::observe::{EngineMetrics, PrepareMetrics};
use crate::api::server::ServerHandle;
use crate::api::{self, EmbedReady, Ready};
use crate::config::{DeviceArg, GenerateArgs, KvCacheDType, ModelArgs, QuantizationArg, ServeArgs, WeightDType};
use crate::engine::embed::{EmbedConfig, EmbedHandle};
use crate::engine::{AdapterRegistry, EngineConfig, EngineCore, EngineHandle, GenerationRequest};
use crate::kv::{KvPool, KvSpec, blocks_for};
use crate::media::{AddressRule, FetchConfig, MediaFetcher, MediaLimits, MediaPool};
use crate::model::lora::AdapterLimits;
use crate::model::{LoadError, ModelFiles, Quantization, VisionLanguageModel};
use crate::processor::embed::EmbedPreparer;
use crate::processor::{ChatMessage, ContentPart, ImageInput, PrepareLimits, PrepareObserver, Preparer, Processor};

/// A model and its processor, loaded from one folder.
pub struct Loaded {
    pub files: ModelFiles,
    pub model: Box<dyn VisionLanguageModel>,
    pub processor: Processor,
    /// What the KV pool stores keys and values in: the model's dtype unless set
    /// (`--kv-cache-dtype`).
    pub kv_dtype: DType,
}

/// How much KV cache to allocate.
#[derive(Debug, Clone, Copy)]
pub enum KvBudget {
    /// As many blocks as fit in this many bytes (`--kv-cache-memory`).
    Memory(usize),
    /// Room for this many tokens (rounded up to whole blocks).
    Tokens(usize),
}

impl Loaded {
    /// The model's KV cache shape, in `kv_dtype`.
    pub fn kv_spec(&self) -> KvSpec {
        KvSpec {
            dtype: self.kv_dtype,
            ..self.model.kv_spec()
        }
    }

    /// An engine over this model with a KV pool of `budget`; the processor stays with the
    /// caller (it runs on the request side).
    pub fn into_engine(self, config: EngineConfig, budget: KvBudget) -> candle_core::Result<(Processor, EngineCore)> {
        let spec = self.kv_spec();
        let bytes = match budget {
            KvBudget::Memory(bytes) => bytes,
            KvBudget::Tokens(tokens) => blocks_for(tokens) * spec.bytes_per_block(),
        };
        let pool = KvPool::with_memory(&spec, bytes)?;
        let tokenizer = self.processor.tokenizer().clone();
        let eos = self.processor.eos_token_ids().to_vec();
        let model: Arc<dyn VisionLanguageModel> = self.model.into();
        Ok((self.processor, EngineCore::new(model, pool, tokenizer, eos, config)))
    }
}

/// Loads a model given as a local folder or a hub id (resolved through the Hugging Face
/// cache, downloaded unless HF_HUB_OFFLINE is set).
pub fn load_model(model: &str, dtype: WeightDType, device: &Device) -> Result<Loaded, LoadError> {
    use crate::model::hub;
    let dir = hub::resolve_model(model, &hub::cache_dir_from_env(), hub::offline_from_env())?;
    load_folder(&dir, dtype, device)
}

/// Loads a model from a local folder in the Hugging Face layout. f32 text layers whose
/// weights are all bf16 values (a bf16 checkpoint at `--dtype f32`) are kept in bf16 and
/// widened exactly as read (`VisionLanguageModel::compact_text`): the same outputs.
pub fn load_folder(dir: &Path, dtype: WeightDType, device: &Device) -> Result<Loaded, LoadError> {
    let mut loaded = load_folder_as_stored(dir, dtype, device)?;
    let layers = (loaded.model.compact_text()).map_err(|e| LoadError::Tensor { message: e.to_string() })?;
    if layers > 0 {
        tracing::info!(
            layers,
            "f32 text layers whose weights are all bf16 values are kept in bf16"
        );
    }
    Ok(loaded)
}

/// `load_folder` with every weight held in `dtype` (for comparisons with the compact form).
pub fn load_folder_as_stored(dir: &Path, dtype: WeightDType, device: &Device) -> Result<Loaded, LoadError> {
    let files = ModelFiles::locate(dir)?;
    let model = crate::model::load(&files, dtype.into(), device)?;
    let processor = Processor::load(&files, model.info())?;
    let kv_dtype = model.kv_spec().dtype;
    Ok(Loaded {
        files,
        model,
        processor,
        kv_dtype,
    })
}

/// A contrastive model and what prepares its inputs, loaded from one folder.
pub struct LoadedEmbedding {
    pub files: ModelFiles,
    pub model: Box<dyn crate::model::embedding::EmbeddingModel>,
    pub processor: crate::processor::embed::EmbedProcessor,
}

/// Loads a contrastive model (CLIP, SigLIP) from a local folder in the Hugging Face layout.
pub fn load_embedding_folder(dir: &Path, dtype: WeightDType, device: &Device) -> Result<LoadedEmbedding, LoadError> {
    let files = ModelFiles::locate(dir)?;
    let family = crate::model::registry::embedding_family(&files)?;
    let model = (family.load)(&files, dtype.into(), device)?;
    let processor = crate::processor::embed::EmbedProcessor::load(&files)?;
    Ok(LoadedEmbedding {
        files,
        model,
        processor,
    })
}

/// Opens `--device`, loads the model onto it and applies `--quantize` and
/// `--kv-cache-dtype`.
pub fn load(args: &ModelArgs) -> anyhow::Result<Loaded> {
    let device = open_device(args.device)?;
    tracing::info!(?device, "loading the model");
    let mut loaded = load_model(&args.model, args.dtype, &device)?;
    if let Some(QuantizationArg::Q8_0) = args.quantize {
        let layers = loaded.model.quantize_text(Quantization::Q8_0)?;
        tracing::info!(layers, "quantized the text model to q8_0");
    }
    loaded.kv_dtype = kv_dtype(args.kv_cache_dtype, loaded.model.dtype(), args.quantize.is_some());
    tracing::info!(dtype = ?loaded.kv_dtype, "KV cache");
    Ok(loaded)
}

/// The dtype the KV pool stores in, for a model computing in `model` whose text weights are
/// quantized or not. Quantized weights already move answers off the unquantized ones, and
/// a cache of half the bytes holds twice the tokens (as llama.cpp, whose cache is f16 by
/// default).
pub fn kv_dtype(choice: KvCacheDType, model: DType, quantized: bool) -> DType {
    match choice {
        KvCacheDType::Auto if quantized => DType::F16,
        KvCacheDType::Auto => model,
        KvCacheDType::F32 => DType::F32,
        KvCacheDType::F16 => DType::F16,
        KvCacheDType::Bf16 => DType::BF16,
    }
}

/// The device `--device` names (a CUDA context is made here, not while parsing flags).
pub fn open_device(device: DeviceArg) -> anyhow::Result<Device> {
    match device {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda(ordinal) => Device::new_cuda(ordinal)
            .map_err(|e| anyhow::anyhow!("cannot open cuda:{ordinal} ({e}); CUDA needs a build with --features cuda")),
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
        _ = api::server::shutdown_signal() => true,
    };
    if !signalled {
        api::server::shutdown_signal().await;
    }
    tracing::info!("shutting down: draining");
    server.shutdown();
    server.wait().await
}

/// Binds the server, then loads the model in the blocking pool and hands it the engine:
/// the socket answers (health says "loading") while the model loads.
pub async fn start(args: ServeArgs) -> anyhow::Result<ServerHandle> {
    anyhow::ensure!(
        args.max_batch_tokens > args.max_num_seqs,
        "--max-batch-tokens ({}) must exceed --max-num-seqs ({}): decodes take one token each and prompts need the rest",
        args.max_batch_tokens,
        args.max_num_seqs
    );
    let server = api::server::start(&args).await?;
    let loading = server.state.clone();
    tokio::spawn(async move {
        let metrics = loading.metrics.clone();
        let model = args.model.model.clone();
        let built = tokio::task::spawn_blocking(move || build_served(&args, metrics)).await;
        match built.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(Served::Generate(ready)) => {
                api::server::mark_ready(&loading, ready).await;
                tracing::info!(%model, "model loaded; ready");
            }
            Ok(Served::Embed(ready)) => {
                api::server::mark_embed_ready(&loading, ready).await;
                tracing::info!(%model, "embedding model loaded; ready");
            }
            Err(err) => {
                tracing::error!(error = %format!("{err:#}"), "model failed to load");
                api::server::mark_failed(&loading, format!("{err:#}"));
            }
        }
    });
    Ok(server)
}

/// What a server serves, once loaded.
enum Served {
    Generate(Ready),
    Embed(EmbedReady),
}

/// The model `--model` names, loaded for its task: a generative model with its engine, or
/// a contrastive one with its batching thread.
fn build_served(args: &ServeArgs, metrics: Arc<crate::metrics::Metrics>) -> anyhow::Result<Served> {
    use crate::model::hub;
    let dir = hub::resolve_model(&args.model.model, &hub::cache_dir_from_env(), hub::offline_from_env())?;
    match crate::model::registry::task(&ModelFiles::locate(&dir)?)? {
        crate::model::registry::Task::Generate(_) => Ok(Served::Generate(build_server_engine(args, metrics)?)),
        crate::model::registry::Task::Embed(_) => Ok(Served::Embed(build_embed_engine(args, &dir)?)),
    }
}

/// A contrastive model's batching thread and the request side that prepares its inputs.
fn build_embed_engine(args: &ServeArgs, dir: &Path) -> anyhow::Result<EmbedReady> {
    anyhow::ensure!(
        args.model.quantize.is_none(),
        "--quantize applies to generative models' text layers; this is an embedding model"
    );
    anyhow::ensure!(
        args.adapters.lora.is_empty(),
        "--lora adapters apply to generative models; this is an embedding model"
    );
    let device = open_device(args.model.device)?;
    let loaded = load_embedding_folder(dir, args.model.dtype, &device)?;
    let config = EmbedConfig {
        max_num_seqs: args.max_num_seqs,
        max_batch_tokens: args.max_batch_tokens,
        max_queue: args.max_queue,
        cache_bytes: args.vision_cache_memory.as_u64() as usize,
    };
    let (engine, _thread) = EmbedHandle::spawn(loaded.model.into(), config);
    let limits = MediaLimits {
        max_image_pixels: args.limits.max_image_pixels,
        max_video_seconds: args.limits.max_video_seconds,
    };
    let workers =
        (args.media.media_workers).unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let pool = MediaPool::new(workers, args.media.media_inline);
    Ok(EmbedReady {
        engine,
        preparer: EmbedPreparer::new(loaded.processor, fetcher(args)?, pool, limits),
    })
}

/// What `serve` runs once its socket is bound: the model, its adapters, the engine thread
/// and the request-side processor with its media workers.
fn build_server_engine(args: &ServeArgs, metrics: Arc<crate::metrics::Metrics>) -> anyhow::Result<Ready> {
    let loaded = load(&args.model)?;
    let adapters = load_adapters(args, &loaded)?;
    let max_positions = loaded.model.info().max_positions;
    let max_model_len = args.max_model_len.unwrap_or(max_positions).min(max_positions);
    let spec = loaded.kv_spec();
    let budget = args.kv_cache_memory.as_u64() as usize;
    let capacity = spec.blocks_in(budget) * crate::kv::BLOCK_TOKENS;
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
    let (processor, mut core) = loaded.into_engine(config, KvBudget::Memory(budget))?;
    processor.set_preprocess_cache_bytes(args.preprocess_cache_memory.as_u64() as usize);
    if let Err(e) = warm_up(&processor, &mut core) {
        tracing::warn!(error = %e, "the warm-up request failed; serving anyway");
    }
    let served = crate::api::observe::Served {
        model_name: &api::server::served_model_name(args),
        max_loras: args.adapters.max_loras,
        block_size: crate::kv::BLOCK_TOKENS,
        num_blocks: core.pool().num_blocks(),
        kv_cache_dtype: format!("{:?}", core.pool().spec().dtype).to_lowercase(),
        prefix_caching: !args.no_prefix_caching,
    };
    let observer = Arc::new(EngineMetrics::new(metrics.clone(), &served));
    let (engine, _thread) = EngineHandle::spawn(core, args.max_queue, Arc::new(adapters), observer);
    Ok(Ready {
        engine,
        preparer: preparer(args, processor, Arc::new(PrepareMetrics(metrics)))?,
    })
}

/// The request side: the processor, and the media fetcher and worker pool it prepares with.
fn preparer(args: &ServeArgs, processor: Processor, observer: Arc<dyn PrepareObserver>) -> anyhow::Result<Preparer> {
    let (media, limits) = (&args.media, &args.limits);
    let fetcher = fetcher(args)?;
    let workers = (media.media_workers).unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let prepare_limits = PrepareLimits {
        media: MediaLimits {
            max_image_pixels: limits.max_image_pixels,
            max_video_seconds: limits.max_video_seconds,
        },
        max_image_tokens: limits.max_image_tokens_per_request,
        max_video_frames: limits.max_video_frames,
    };
    let pool = MediaPool::new(workers, media.media_inline);
    Ok(Preparer::new(
        Arc::new(processor),
        fetcher,
        pool,
        prepare_limits,
        observer,
    ))
}

/// The media fetcher `--media-*` and `--max-media-size` configure.
fn fetcher(args: &ServeArgs) -> anyhow::Result<MediaFetcher> {
    let media = &args.media;
    MediaFetcher::new(FetchConfig {
        timeout: media.media_fetch_timeout,
        max_redirects: media.max_media_redirects,
        max_bytes: args.limits.max_media_size.as_u64() as usize,
        allowed_domains: (media.allowed_media_domains.iter())
            .map(|d| d.trim().to_ascii_lowercase())
            .collect(),
        addresses: AddressRule {
            allow_private: media.allow_private_media_addresses,
            allowed_networks: media.allowed_media_networks.clone(),
        },
        allowed_local_path: media.allowed_local_media_path.clone(),
    })
    .map_err(anyhow::Error::msg)
}

/// The adapters of `--lora`, read before the server reports ready: a broken one stops it.
fn load_adapters(args: &ServeArgs, loaded: &Loaded) -> anyhow::Result<AdapterRegistry> {
    let adapters = &args.adapters;
    let limits = AdapterLimits {
        max_loras: adapters.max_loras,
        max_rank: adapters.max_lora_rank,
    };
    let model = &loaded.model;
    let registry = AdapterRegistry::new(
        &api::server::served_model_name(args),
        model.adapter_layout(),
        model.dtype(),
        model.device().clone(),
        limits,
    );
    for lora in &adapters.lora {
        let adapter = (registry.load(&lora.name, &lora.path)).with_context(|| format!("--lora {}", lora.name))?;
        let (rank, modules) = (adapter.rank(), adapter.modules());
        tracing::info!(name = lora.name, rank, modules, "adapter loaded");
    }
    Ok(registry)
}

/// One small image request through the whole engine before the server reports ready: the
/// first vision encode and forward passes fault in their buffers and start the thread pools,
/// which made a fresh server's first photo request (detail low) take 1.27 s to its first token
/// against 0.08 s for the next. vLLM likewise runs the model once at startup.
fn warm_up(processor: &Processor, core: &mut EngineCore) -> anyhow::Result<()> {
    let started = Instant::now();
    let messages = [ChatMessage {
        role: "user".into(),
        content: vec![
            ContentPart::Image,
            ContentPart::Text {
                text: "Warm up.".into(),
            },
        ],
        ..ChatMessage::default()
    }];
    let image = ImageInput::with_detail(image::DynamicImage::new_rgb8(64, 64), crate::model::Detail::Low);
    let prompt = processor.process(&messages, &[image])?;
    crate::engine::generate(core, vec![GenerationRequest::greedy(prompt, 2)], |_| {})?;
    tracing::info!(took = ?started.elapsed(), "warmed up");
    Ok(())
}

/// `ocellus generate`: one prompt about zero or more images, then the timings.
pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let loaded = load(&args.model)?;
    let images = (args.images.iter())
        .map(|path| crate::processor::open_image(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::text("system", system));
    }
    let mut content = vec![ContentPart::Image; images.len()];
    content.push(ContentPart::Text {
        text: args.prompt.clone(),
    });
    messages.push(ChatMessage {
        role: "user".into(),
        content,
        ..ChatMessage::default()
    });
    let detail = if args.no_split {
        crate::model::Detail::Low
    } else {
        crate::model::Detail::Auto
    };
    let images: Vec<ImageInput> = images
        .into_iter()
        .map(|image| ImageInput::with_detail(image, detail))
        .collect();
    let prompt = loaded.processor.process(&messages, &images)?;
    let prompt_tokens = prompt.token_ids.len();
    // The encoder's units: SmolVLM's tiles, Qwen-VL's patches.
    let tiles: usize = prompt.images.iter().map(|i| i.pixels.values.dim(0).unwrap_or(0)).sum();
    let mut request = GenerationRequest::greedy(prompt, args.max_tokens);
    request.params.sampling = crate::engine::SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let config = EngineConfig {
        max_num_seqs: 1,
        max_batch_tokens: args.max_batch_tokens,
        max_model_len: loaded.model.info().max_positions,
        vision_cache_bytes: 0,
        prefix_caching: false,
    };
    let (_processor, mut engine) = loaded.into_engine(config, KvBudget::Tokens(prompt_tokens + args.max_tokens))?;
    let (mut generations, t) = crate::engine::generate(&mut engine, vec![request], |_| {})?;
    let generation = generations.remove(0);
    println!("{}", generation.text);
    let per_tile = match tiles {
        0 => 0.0,
        n => t.vision.as_secs_f64() * 1e3 / n as f64,
    };
    eprintln!(
        "prompt {prompt_tokens} tokens, {tiles} image tiles/patches | vision encode {:.3} s ({per_tile:.1} ms each) | \
         prefill {:.3} s ({:.0} tokens/s) | decode {} tokens in {:.3} s ({:.1} tokens/s) | finish {}",
        t.vision.as_secs_f64(),
        t.prefill.as_secs_f64(),
        prompt_tokens as f64 / t.prefill.as_secs_f64(),
        t.decode_steps,
        t.decode.as_secs_f64(),
        t.decode_steps as f64 / t.decode.as_secs_f64().max(1e-9),
        generation.finish_reason.as_str(),
    );
    Ok(())
}

/// `ocellus evaluate`: greedy answers to held-out conversations (`train::evaluate` reads
/// them and scores the answers), with or without a LoRA adapter.
pub fn evaluate(args: &crate::config::EvaluateArgs) -> anyhow::Result<serde_json::Value> {
    use crate::train::evaluate::{read_cases, score};
    let dir = crate::model::hub::resolve_model(
        &args.model,
        &crate::model::hub::cache_dir_from_env(),
        crate::model::hub::offline_from_env(),
    )?;
    if let crate::model::registry::Task::Embed(_) = crate::model::registry::task(&ModelFiles::locate(&dir)?)? {
        anyhow::ensure!(args.lora.is_none(), "--lora applies to generative models");
        anyhow::ensure!(args.pairs_out.is_none(), "--pairs-out applies to generative models");
        anyhow::ensure!(
            args.answer_regex.is_none(),
            "--answer-regex applies to generative models"
        );
        anyhow::ensure!(
            args.columns.is_empty(),
            "--columns applies to generative models' datasets"
        );
        let loaded = load_embedding_folder(&dir, WeightDType::F32, &Device::Cpu)?;
        return crate::train::zero_shot::evaluate(loaded.model.as_ref(), &loaded.processor, &args.data);
    }
    let loaded = load_model(&args.model, WeightDType::F32, &Device::Cpu)?;
    let adapter = match &args.lora {
        Some(dir) => {
            let model = &loaded.model;
            let layout = model.adapter_layout();
            let adapter =
                crate::model::lora::Adapter::load("eval", dir, &layout, usize::MAX, model.dtype(), model.device())?;
            Some(Arc::new(adapter))
        }
        None => None,
    };
    let mut requests = Vec::new();
    let mut expected = Vec::new();
    let columns = crate::train::dataset::Columns::parse(&args.columns).map_err(|e| anyhow::anyhow!("--columns {e}"))?;
    let dataset = crate::train::dataset::Dataset::open(&args.data, &args.split, &columns)?;
    let cases = read_cases(&dataset)?;
    for (index, case) in cases.iter().enumerate() {
        let prompt = (loaded.processor.process(&case.messages, &case.images))
            .with_context(|| format!("{}: case {}", dataset.name().display(), index + 1))?;
        let mut request = GenerationRequest::greedy(prompt, args.max_tokens);
        request.adapter = adapter.clone();
        requests.push(request);
        expected.push((case.kind.clone(), case.answer.clone()));
    }
    let longest = requests.iter().map(|r| r.prompt.token_ids.len()).max().unwrap_or(0);
    let config = EngineConfig {
        max_num_seqs: 64,
        max_batch_tokens: 4096.max(longest + 64),
        max_model_len: loaded.model.info().max_positions,
        vision_cache_bytes: 64 << 20,
        prefix_caching: true,
    };
    let budget = KvBudget::Tokens(64 * blocks_for(longest + args.max_tokens) * crate::kv::BLOCK_TOKENS);
    let (processor, mut engine) = loaded.into_engine(config, budget)?;
    let (generations, _) = crate::engine::generate(&mut engine, requests, |_| {})?;
    let answers = (generations.iter())
        .map(|g| processor.decode(&g.tokens))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(out) = &args.pairs_out {
        let count = crate::train::evaluate::write_mistake_pairs(&cases, &answers, out)?;
        eprintln!(
            "{count} preference pairs from wrong answers written to {}",
            out.display()
        );
    }
    Ok(score(&expected, &answers, args.answer_regex.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_stores_in_the_models_dtype_unless_quantized() {
        assert_eq!(kv_dtype(KvCacheDType::Auto, DType::BF16, false), DType::BF16);
        assert_eq!(kv_dtype(KvCacheDType::Auto, DType::F32, true), DType::F16);
        assert_eq!(kv_dtype(KvCacheDType::F32, DType::F32, true), DType::F32);
        assert_eq!(kv_dtype(KvCacheDType::Bf16, DType::F32, false), DType::BF16);
    }
}
