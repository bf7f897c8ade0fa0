//! `BlipForImageTextRetrieval`'s config.json, with transformers' defaults (`BlipTextConfig`,
//! `BlipVisionConfig`) where a field is absent, checked.

use std::path::Path;

use serde::Deserialize;

use crate::model::LoadError;
use crate::model::encoder::{Activation, EncoderConfig, check_towers};
use crate::model::files::read_json;

#[derive(Debug, Clone, Deserialize)]
pub struct BlipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    /// The width of the contrastive embeddings (`vision_proj`, `text_proj`).
    #[serde(default = "defaults::image_text_hidden_size")]
    pub image_text_hidden_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::text_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::text_eps")]
    pub layer_norm_eps: f64,
    /// The width of what cross-attention attends to: the vision tower's hidden size.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Whether the layers have cross-attention (`crossattention.*`), which matching needs.
    #[serde(default = "defaults::yes")]
    pub is_decoder: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::vision_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::gelu")]
    pub hidden_act: String,
    #[serde(default = "defaults::vision_eps")]
    pub layer_norm_eps: f64,
}

impl Default for TextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every text field has a default. This is a bug.")
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every vision field has a default. This is a bug.")
    }
}

impl BlipConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let config: Self = read_json(path)?;
        let ensure = |ok: bool, field: &str, message: String| match ok {
            true => Ok(()),
            false => Err(LoadError::invalid(path, field, message)),
        };
        let (t, v) = (&config.text_config, &config.vision_config);
        check_towers(
            path,
            (t.hidden_size, t.num_attention_heads, &t.hidden_act),
            (v.hidden_size, v.num_attention_heads, &v.hidden_act),
            (v.patch_size, v.image_size),
        )?;
        ensure(
            t.is_decoder,
            "text_config.is_decoder",
            "must be true: image-text matching needs the text encoder's cross-attention".into(),
        )?;
        ensure(
            t.encoder_hidden_size.is_none_or(|e| e == v.hidden_size),
            "text_config.encoder_hidden_size",
            format!("must equal vision_config.hidden_size {}", v.hidden_size),
        )?;
        Ok(config)
    }
}

impl VisionConfig {
    pub fn encoder(&self) -> EncoderConfig {
        let sizes = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
        );
        EncoderConfig::of(sizes, self.layer_norm_eps, &self.hidden_act, Activation::GeluErf)
    }
}

mod defaults {
    pub fn image_text_hidden_size() -> usize {
        256
    }
    pub fn text_vocab() -> usize {
        30524
    }
    pub fn hidden() -> usize {
        768
    }
    pub fn intermediate() -> usize {
        3072
    }
    pub fn layers() -> usize {
        12
    }
    pub fn text_heads() -> usize {
        8
    }
    pub fn vision_heads() -> usize {
        12
    }
    pub fn text_positions() -> usize {
        512
    }
    pub fn gelu() -> String {
        "gelu".into()
    }
    pub fn text_eps() -> f64 {
        1e-12
    }
    pub fn vision_eps() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
    pub fn image_size() -> usize {
        384
    }
    pub fn patch_size() -> usize {
        16
    }
}
