//! `SiglipModel`'s config.json, with transformers' defaults (`SiglipTextConfig`,
//! `SiglipVisionConfig`) where a field is absent (the hub's base config gives only five
//! text fields and the patch size), checked.

use std::path::Path;

use serde::Deserialize;

use crate::model::LoadError;
use crate::model::encoder::{Activation, EncoderConfig, check_towers};
use crate::model::files::read_json;

#[derive(Debug, Clone, Deserialize)]
pub struct SiglipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::vocab")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::act")]
    pub hidden_act: String,
    #[serde(default = "defaults::eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "defaults::pad")]
    pub pad_token_id: u32,
    /// The text head's width; `hidden_size` where absent.
    #[serde(default)]
    pub projection_size: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::act")]
    pub hidden_act: String,
    #[serde(default = "defaults::eps")]
    pub layer_norm_eps: f64,
    /// The attention-pooling head (`head.probe`, `head.attention`); true unless set.
    #[serde(default = "defaults::yes")]
    pub vision_use_head: bool,
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

impl SiglipConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let config: Self = read_json(path)?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), LoadError> {
        let ensure = |ok: bool, field: &str, message: String| match ok {
            true => Ok(()),
            false => Err(LoadError::invalid(path, field, message)),
        };
        let (t, v) = (&self.text_config, &self.vision_config);
        check_towers(
            path,
            (t.hidden_size, t.num_attention_heads, &t.hidden_act),
            (v.hidden_size, v.num_attention_heads, &v.hidden_act),
            (v.patch_size, v.image_size),
        )?;
        ensure(
            v.vision_use_head,
            "vision_config.vision_use_head",
            "must be true: the image embedding is the attention-pooling head's output".into(),
        )?;
        ensure(
            self.text_config.projection() == v.hidden_size,
            "text_config.projection_size",
            format!(
                "{} differs from the image embedding's width {}",
                self.text_config.projection(),
                v.hidden_size
            ),
        )?;
        ensure(
            (t.pad_token_id as usize) < t.vocab_size && t.max_position_embeddings > 0,
            "text_config.pad_token_id",
            format!("{} is not below vocab_size {}", t.pad_token_id, t.vocab_size),
        )
    }
}

impl TextConfig {
    pub fn projection(&self) -> usize {
        self.projection_size.unwrap_or(self.hidden_size)
    }

    pub fn encoder(&self) -> EncoderConfig {
        let sizes = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
        );
        EncoderConfig::of(sizes, self.layer_norm_eps, &self.hidden_act, Activation::GeluTanh)
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
        EncoderConfig::of(sizes, self.layer_norm_eps, &self.hidden_act, Activation::GeluTanh)
    }
}

mod defaults {
    pub fn vocab() -> usize {
        32000
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
    pub fn heads() -> usize {
        12
    }
    pub fn positions() -> usize {
        64
    }
    pub fn act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn pad() -> u32 {
        1
    }
    pub fn channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        16
    }
    pub fn yes() -> bool {
        true
    }
}
