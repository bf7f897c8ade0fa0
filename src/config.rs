//! Command-line configuration: one struct per command, each flag also an `OCELLUS_*`
//! environment variable. The doc comments are the `--help` text. Plain data: what the
//! values mean is for `runtime` (and the layers it hands them to) to apply.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};

/// The built-in model: the demo SmolVLM trained by `ocellus finetune` on `ocellus
/// demo-data` (colours, shapes, counts, positions, digits; see the README), carried in the
/// binary (`model::demo`).
pub const DEFAULT_MODEL: &str = "ocellus-demo";

#[derive(Debug, Parser)]
#[command(name = "ocellus", version, about = "An inference server for vision-language models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at startup: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models,
    /// /health, /metrics).
    Serve(ServeArgs),
    /// Answer one prompt about zero or more images, then print the timings.
    Generate(GenerateArgs),
    /// Fine-tune a model on JSONL conversations (LoRA or every text weight) and save the
    /// result: a PEFT adapter, or a model folder.
    Finetune(FinetuneArgs),
    /// Write the demo task's data: images of coloured shapes and digits with one-word
    /// questions (colour, shape, count, position, digit), seeded.
    DemoData(DemoDataArgs),
    /// Answer the conversations of a JSONL file greedily and report exact-match accuracy
    /// against their last assistant turn, per `kind`, as JSON.
    Evaluate(EvaluateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DemoDataArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Training conversations (`train.jsonl`), drawn from `--seed`.
    #[arg(long, default_value_t = 5000)]
    pub train: usize,
    /// Held-out conversations (`test.jsonl`), drawn from `--seed` + 1000000: never the
    /// training images.
    #[arg(long, default_value_t = 200)]
    pub test: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write image/caption pairs (`train-captions.jsonl`, `test-captions.jsonl`) for
    /// contrastive fine-tuning and zero-shot evaluation, from the same images.
    #[arg(long)]
    pub captions: bool,
    /// Also write preference pairs for `--method dpo` (`train-pairs.jsonl`) from the
    /// training images: the answer chosen, a wrong one rejected (a 2's or 5's mirror
    /// image, another digit's nearest glyph, else another answer of the same kind).
    #[arg(long)]
    pub preferences: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EvaluateArgs {
    #[arg(long, env = "OCELLUS_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// A LoRA adapter folder to answer with.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Rows in any form `ocellus finetune --data` reads: a conversation ending with the
    /// expected answer, or a preference pair (the chosen answer expected).
    #[arg(long)]
    pub data: PathBuf,
    /// The split read from a dataset folder or hub id.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Columns of another name, as OURS=THEIRS pairs (as `finetune --columns`).
    #[arg(long, value_delimiter = ',')]
    pub columns: Vec<String>,
    /// Score what this regular expression finds in each answer (its first group, else the
    /// whole match) instead of the whole answer: `--answer-regex 'answer is \(?([A-D])'`.
    #[arg(long)]
    pub answer_regex: Option<regex::Regex>,
    /// Longest answer generated.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: usize,
    /// Also write a preference pair (`--method dpo`'s format) for every wrong answer: the
    /// expected answer chosen, the model's rejected; image paths as in `--data`, so write
    /// it beside that file.
    #[arg(long)]
    pub pairs_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FinetuneMethod {
    /// Low-rank adapters on the chosen projections; saved in PEFT's format.
    Lora,
    /// Every weight: vision encoder, connector and text model; saved as a model folder.
    Full,
    /// A contrastive model (CLIP, SigLIP) on image/caption pairs, with in-batch negatives
    /// (`--contrastive-weights` chooses what trains); saved as a model folder.
    Contrastive,
    /// Direct Preference Optimisation on prompt/chosen/rejected pairs (`--dpo-weights`:
    /// LoRA, saved as an adapter, or every weight, saved as a model folder).
    Dpo,
}

/// What `--method dpo` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DpoWeights {
    /// LoRA pairs as `--method lora` places them; the reference is the base.
    Lora,
    /// Every weight, as `--method full`; the reference is the starting weights.
    Full,
}

/// TRL's DPO `loss_type`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DpoLoss {
    /// `-log sigmoid(beta · margin)`: the DPO paper's.
    Sigmoid,
    /// `max(0, 1 - beta · margin)`: SLiC's.
    Hinge,
    /// `(margin per token - 1 / (2 beta))²`: IPO's, with TRL's per-token averaging.
    Ipo,
}

/// What `--method contrastive` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ContrastiveWeights {
    /// Every weight.
    Full,
    /// LoRA pairs (`--lora-r`, `--lora-alpha`) beside every linear layer of both towers,
    /// and the logit scale and bias; merged into the weights when saved.
    Lora,
}

#[derive(Debug, Clone, Args)]
pub struct FinetuneArgs {
    /// The model to start from: a local folder in the Hugging Face layout.
    #[arg(long, env = "OCELLUS_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Training conversations: a JSONL file (one object with OpenAI-style `messages` per
    /// line; under `--method dpo`: `prompt`, `chosen`, `rejected`), a Parquet file, a folder
    /// in the hub's dataset layout or a hub dataset id (TRL's columns: `messages` or
    /// `prompt`/`chosen`/`rejected`, with `images`); images as paths relative to the file,
    /// file:// URLs, data: URIs or `datasets`' encoded bytes.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out conversations in any of the same forms: their loss is reported before
    /// training and after each epoch.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// The split `--data` reads from a dataset folder or hub id.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// The split `--eval` reads from a dataset folder or hub id.
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    /// Columns of another name, as OURS=THEIRS pairs: `--columns images=image,prompt=question`.
    #[arg(long, value_delimiter = ',')]
    pub columns: Vec<String>,
    #[arg(long, value_enum, default_value = "lora")]
    pub method: FinetuneMethod,
    /// Where the adapter (or model) and the `checkpoint-STEP` folders are written.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f32,
    /// Start the LoRA pairs from this PEFT adapter folder's weights (same rank and
    /// modules) instead of PEFT's initialisation.
    #[arg(long)]
    pub lora_init: Option<PathBuf>,
    /// The projections LoRA adapts: of the text model, in every layer, q_proj, k_proj,
    /// v_proj, o_proj, gate_proj, up_proj, down_proj, and lm_head; of the vision encoder, in
    /// every layer, vision.q_proj, vision.k_proj, vision.v_proj, vision.out_proj,
    /// vision.fc1, vision.fc2; and connector (its projection). A LoRA on the vision side
    /// encodes each image at every step, where a text-only one encodes it once.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub lora_target_modules: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the learning rate decays over them).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Peak learning rate, decayed linearly to 0.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Conversations per forward pass: their linear layers run as one matrix.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Forward passes per optimizer step: a step sees batch size x this many conversations.
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,
    /// QLoRA: keep the frozen base's text projections, head and embedding in int8 blocks
    /// (`q8_0`), expanded to f32 one layer at a time; LoRA pairs train in f32. Turns
    /// `--gradient-checkpointing` on unless `--no-gradient-checkpointing` is given (as PEFT's
    /// `prepare_model_for_kbit_training` does).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizationArg>,
    /// Keep only each decoder layer's input during the forward pass and run the layer again
    /// in the backward pass: far less memory, for a second forward pass of each layer.
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// Keep every activation, also under `--quantize`.
    #[arg(long, overrides_with = "gradient_checkpointing")]
    pub no_gradient_checkpointing: bool,
    /// Clip the gradients' global L2 norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Save a checkpoint every this many steps (none: only the final result).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Continue from a checkpoint folder written by a run with the same flags.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Without a terminal, print the loss every this many steps.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Seeds the LoRA initialisation, the data order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Longest conversation, image tokens included; a longer one stops with an error
    /// naming its line.
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    #[arg(long, default_value = "20MiB")]
    pub max_image_size: ByteSize,
    #[arg(long, default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Under `--method contrastive`: every weight, or LoRA pairs merged when saved.
    #[arg(long, value_enum, default_value = "full")]
    pub contrastive_weights: ContrastiveWeights,
    /// Under `--method dpo`: LoRA pairs or every weight.
    #[arg(long, value_enum, default_value = "lora")]
    pub dpo_weights: DpoWeights,
    /// Under `--method dpo`: how far from the reference the policy may go (TRL's `beta`).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Under `--method dpo`: TRL's `loss_type`.
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub dpo_loss: DpoLoss,
    /// Under `--method dpo`: add this times the chosen completions' mean token NLL (TRL's
    /// `loss_type=[..., "sft"]` with `loss_weights=[1, W]`; RPO's alpha), which keeps the
    /// chosen answers likely while the margin grows.
    #[arg(long, default_value_t = 0.0)]
    pub sft_weight: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "OCELLUS_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "OCELLUS_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Port of the gRPC API (`ocellus.v1`, health, reflection) on the same host; none: no
    /// gRPC (0: any free port).
    #[arg(long, env = "OCELLUS_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// The name clients give as `model`; defaults to the hub id, or a folder's name.
    #[arg(long, env = "OCELLUS_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on the /v1 routes.
    #[arg(long, env = "OCELLUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve no chat page at `/` (the API only).
    #[arg(long, env = "OCELLUS_NO_WEB_UI")]
    pub no_web_ui: bool,
    /// Most sequences running at once.
    #[arg(long, env = "OCELLUS_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens in one step: every running sequence's decode token plus prompt chunks.
    #[arg(long, env = "OCELLUS_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Most tokens a sequence may reach, prompt plus output; defaults to the model's.
    #[arg(long, env = "OCELLUS_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Most sequences waiting to start; past it requests get 429.
    #[arg(long, env = "OCELLUS_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Memory for the KV cache (e.g. 1GiB, 512MiB).
    #[arg(long, env = "OCELLUS_KV_CACHE_MEMORY", default_value = "1GiB")]
    pub kv_cache_memory: ByteSize,
    /// Memory for the vision features of recent images, reused when an image comes again
    /// (0 disables the cache).
    #[arg(long, env = "OCELLUS_VISION_CACHE_MEMORY", default_value = "256MiB")]
    pub vision_cache_memory: ByteSize,
    /// Memory for recent images' preprocessed pixels, so that an image sent again is not
    /// resized again (0 disables the cache).
    #[arg(long, env = "OCELLUS_PREPROCESS_CACHE_MEMORY", default_value = "128MiB")]
    pub preprocess_cache_memory: ByteSize,
    /// Turns off prefix caching (on by default: a prompt that begins with the same tokens
    /// and images as an earlier one reuses their KV blocks instead of prefilling them).
    #[arg(long, env = "OCELLUS_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Origins allowed by CORS (comma-separated; * for any). None: no CORS headers.
    #[arg(long, env = "OCELLUS_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// A request still running after this long fails with 504 (e.g. 600s, 10m).
    #[arg(long, env = "OCELLUS_REQUEST_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// On SIGTERM or SIGINT, how long running requests may take to finish.
    #[arg(long, env = "OCELLUS_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub media: MediaArgs,
    #[command(flatten)]
    pub adapters: AdapterArgs,
}

/// LoRA adapters served beside the base model.
#[derive(Debug, Clone, Args)]
pub struct AdapterArgs {
    /// A PEFT LoRA adapter folder to serve as model NAME (repeatable; comma-separated in
    /// the environment): requests whose `model` is NAME generate with it.
    #[arg(long = "lora", env = "OCELLUS_LORA", value_name = "NAME=DIR", value_delimiter = ',', value_parser = parse_lora)]
    pub lora: Vec<LoraArg>,
    /// Most adapters loaded at once, from `--lora` and `/v1/load_lora_adapter` together.
    #[arg(long, env = "OCELLUS_MAX_LORAS", default_value_t = 8)]
    pub max_loras: usize,
    /// Largest rank an adapter's module may have.
    #[arg(long, env = "OCELLUS_MAX_LORA_RANK", default_value_t = 64)]
    pub max_lora_rank: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    pub name: String,
    pub path: PathBuf,
}

fn parse_lora(value: &str) -> Result<LoraArg, String> {
    match value.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(LoraArg {
            name: name.to_string(),
            path: PathBuf::from(path),
        }),
        _ => Err(format!("`{value}`: expected NAME=DIR")),
    }
}

/// Where media may come from, and the pool that decodes it.
#[derive(Debug, Clone, Args)]
pub struct MediaArgs {
    /// The folder `file://` image URLs may read from (resolved, symlinks included); none:
    /// local files are refused.
    #[arg(long, env = "OCELLUS_ALLOWED_LOCAL_MEDIA_PATH")]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Hosts http(s) media URLs may name, with their subdomains (comma-separated); none: any
    /// host. Checked on every redirect.
    #[arg(long, env = "OCELLUS_ALLOWED_MEDIA_DOMAINS", value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Fetch media from any address: loopback, private, link-local (cloud metadata) and
    /// unique-local ones included, which are refused by default (the address connected to is
    /// checked, on every redirect). Also lets the fetcher use the environment's proxy.
    #[arg(long, env = "OCELLUS_ALLOW_PRIVATE_MEDIA_ADDRESSES")]
    pub allow_private_media_addresses: bool,
    /// Networks media may come from although they are not public (comma-separated CIDRs,
    /// e.g. an internal image store's `10.1.0.0/16`); the rest stay refused.
    #[arg(long, env = "OCELLUS_ALLOWED_MEDIA_NETWORKS", value_delimiter = ',')]
    pub allowed_media_networks: Vec<ipnet::IpNet>,
    /// Fetching one media URL, connection to last byte.
    #[arg(long, env = "OCELLUS_MEDIA_FETCH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub media_fetch_timeout: std::time::Duration,
    #[arg(long, env = "OCELLUS_MAX_MEDIA_REDIRECTS", default_value_t = 3)]
    pub max_media_redirects: usize,
    /// Media decoding and preprocessing jobs at once (default: the CPU count).
    #[arg(long, env = "OCELLUS_MEDIA_WORKERS")]
    pub media_workers: Option<usize>,
    /// Run media jobs on the async workers instead of the pool: only to measure the pool.
    #[arg(long, env = "OCELLUS_MEDIA_INLINE", hide = true)]
    pub media_inline: bool,
}

/// Bounds on what one request may send or ask for.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request body (413 past it).
    #[arg(long, env = "OCELLUS_MAX_BODY_SIZE", default_value = "32MiB")]
    pub max_body_size: ByteSize,
    #[arg(long, env = "OCELLUS_MAX_IMAGES_PER_REQUEST", default_value_t = 8)]
    pub max_images_per_request: usize,
    /// Most image tokens (tiles x tokens per tile) one request may bring, checked from the
    /// image headers before decoding.
    #[arg(long, env = "OCELLUS_MAX_IMAGE_TOKENS_PER_REQUEST", default_value_t = 8192)]
    pub max_image_tokens_per_request: usize,
    /// Largest media file, however it arrives (data URI, URL, local file).
    #[arg(long, env = "OCELLUS_MAX_MEDIA_SIZE", default_value = "20MiB")]
    pub max_media_size: ByteSize,
    /// Most pixels (width x height) of one image or video frame, checked before decoding.
    #[arg(long, env = "OCELLUS_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    #[arg(long, env = "OCELLUS_MAX_VIDEOS_PER_REQUEST", default_value_t = 2)]
    pub max_videos_per_request: usize,
    /// Most frames sampled from one video; a request's `max_frames` may not exceed it (the
    /// model's own `max_frames` is the default when it is lower).
    #[arg(long, env = "OCELLUS_MAX_VIDEO_FRAMES", default_value_t = 64)]
    pub max_video_frames: usize,
    /// The largest pixel budget (`min_pixels`, `max_pixels` on an image part or in
    /// `mm_processor_kwargs`) a request may give one image, for models that resize images to
    /// a budget (Qwen3-VL). The default is Qwen3-VL's own largest (16384 blocks of 32x32).
    #[arg(long, env = "OCELLUS_MAX_PIXELS_PER_IMAGE", default_value_t = 16_777_216)]
    pub max_pixels_per_image: usize,
    /// Longest video, in seconds, read from the container's header before decoding.
    #[arg(long, env = "OCELLUS_MAX_VIDEO_SECONDS", default_value_t = 1800.0)]
    pub max_video_seconds: f64,
    /// Most choices (`n`) per request.
    #[arg(long, env = "OCELLUS_MAX_N", default_value_t = 8)]
    pub max_n: usize,
    #[arg(long, env = "OCELLUS_MAX_STOP_SEQUENCES", default_value_t = 16)]
    pub max_stop_sequences: usize,
    /// Most alternatives per token in `top_logprobs` (chat) or `logprobs` (completions).
    #[arg(long, env = "OCELLUS_MAX_TOP_LOGPROBS", default_value_t = 20)]
    pub max_top_logprobs: usize,
    /// Most inputs (texts and images) of one embedding, score or rerank request.
    #[arg(long, env = "OCELLUS_MAX_EMBEDDING_INPUTS", default_value_t = 256)]
    pub max_embedding_inputs: usize,
    /// How deeply a JSON schema in `response_format` or `structured_outputs` may nest
    /// (objects and arrays in the schema document).
    #[arg(long, env = "OCELLUS_MAX_SCHEMA_DEPTH", default_value_t = 32)]
    pub max_schema_depth: usize,
}

impl ServeArgs {
    /// Defaults for a server on a free loopback port, as tests and benchmarks start it;
    /// `extra` are more command-line flags.
    pub fn for_model(model: &str, extra: &[String]) -> Self {
        let mut argv = vec![
            "ocellus",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ];
        argv.extend(extra.iter().map(String::as_str));
        match Cli::parse_from(argv).command {
            Command::Serve(args) => args,
            _ => unreachable!("parsed a serve command. This is a bug."),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model: a local folder in the Hugging Face layout, or a hub id resolved through the
    /// Hugging Face cache (HF_HOME / HF_HUB_CACHE) and downloaded unless HF_HUB_OFFLINE=1.
    #[arg(long, env = "OCELLUS_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Weight and activation dtype.
    #[arg(long, env = "OCELLUS_DTYPE", value_enum, default_value = "f32")]
    pub dtype: WeightDType,
    /// Store the text model's linear layers quantized (`q8_0`: int8 blocks): faster decode,
    /// answers close to but not always equal to unquantized ones.
    #[arg(long, env = "OCELLUS_QUANTIZE", value_enum)]
    pub quantize: Option<QuantizationArg>,
    /// What the KV cache stores keys and values in: `auto` is the model's dtype, or f16
    /// under `--quantize`. f16 and bf16 hold twice the tokens in the same memory, at a
    /// rounding of every key and value.
    #[arg(long, env = "OCELLUS_KV_CACHE_DTYPE", value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDType,
    /// Where weights, KV cache and vision encoding live: `cpu`, or `cuda:N` (`cuda` is
    /// `cuda:0`) in a build with `--features cuda` (scripts/build-cuda.sh).
    #[arg(long, env = "OCELLUS_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
}

/// A parsed `--device`; the device itself is opened at load time (a CUDA context is not
/// something to create while parsing flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda(usize),
}

fn parse_device(value: &str) -> Result<DeviceArg, String> {
    match value {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" => Ok(DeviceArg::Cuda(0)),
        _ => value
            .strip_prefix("cuda:")
            .and_then(|ordinal| ordinal.parse().ok())
            .map(DeviceArg::Cuda)
            .ok_or_else(|| format!("expected cpu, cuda or cuda:N, got {value:?}")),
    }
}

/// The dtype weights are loaded in (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDType {
    F32,
    Bf16,
    F16,
}

impl From<WeightDType> for candle_core::DType {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::F32 => Self::F32,
            WeightDType::Bf16 => Self::BF16,
            WeightDType::F16 => Self::F16,
        }
    }
}

/// Weight quantization (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizationArg {
    /// ggml's Q8_0: blocks of 32 int8 weights with one f16 scale.
    #[value(name = "q8_0")]
    Q8_0,
}

/// What the KV pool stores keys and values in (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvCacheDType {
    /// The model's dtype; f16 when the text model is quantized.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image file; repeat for several images (they come before the prompt).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// The question or instruction.
    #[arg(long)]
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// One view per image instead of tiles (what `detail: "low"` asks for).
    #[arg(long)]
    pub no_split: bool,
    /// Most prompt tokens prefilled in one step.
    #[arg(long, env = "OCELLUS_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
}
