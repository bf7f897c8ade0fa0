//! Command-line configuration: one struct per command, each flag also an `OCELLUS_*`
//! environment variable. The doc comments are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::WeightDType;

/// The built-in model: the committed tiny fixture (random weights, real SmolVLM layout).
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/tiny-idefics3");

#[derive(Debug, Parser)]
#[command(name = "ocellus", version, about = "An inference server for vision-language models")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Answer one prompt about zero or more images, then print the timings.
    Generate(GenerateArgs),
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
