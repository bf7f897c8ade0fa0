//! `CLIPModel`'s config.json, with transformers' defaults (`CLIPTextConfig`,
//! `CLIPVisionConfig`) where a field is absent, checked.

use std::path::Path;

use serde::Deserialize;

use crate::model::LoadError;
use crate::model::encoder::{Activation, EncoderConfig, check_towers};
use crate::model::files::read_json;

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "defaults::logit_scale_init_value")]
    pub logit_scale_init_value: f32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::text_vocab")]
    pub vocab_size: usize,
    #[serde(default = "defaults::text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::text_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::text_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::act")]
    pub hidden_act: String,
    #[serde(default = "defaults::eps")]
    pub layer_norm_eps: f64,
    /// 2 in configs written before transformers' PR #24773: the text is pooled at its
    /// highest token id (the end of text in CLIP's vocabulary); otherwise at the first
    /// `eos_token_id`.
    #[serde(default = "defaults::eos")]
    pub eos_token_id: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "defaults::vision_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::vision_heads")]
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

/// Where a text's features are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// At the highest token id (the legacy `eos_token_id == 2` rule).
    HighestId,
    /// At the first occurrence of this id.
    FirstOf(u32),
}

impl Pooling {
    /// The position of `text` whose state becomes its features.
    pub fn position(self, text: &[u32]) -> usize {
        match self {
            // torch's argmax: the first of equal maxima.
            Self::HighestId => {
                let max = text.iter().copied().max().unwrap_or(0);
                text.iter().position(|&id| id == max).unwrap_or(0)
            }
            // No end token: transformers' argmax of all zeros, the first position.
            Self::FirstOf(eos) => text.iter().position(|&id| id == eos).unwrap_or(0),
        }
    }
}

impl ClipConfig {
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
        let t = &self.text_config;
        let v = &self.vision_config;
        check_towers(
            path,
            (t.hidden_size, t.num_attention_heads, &t.hidden_act),
            (v.hidden_size, v.num_attention_heads, &v.hidden_act),
            (v.patch_size, v.image_size),
        )?;
        ensure(
            t.max_position_embeddings > 1 && self.projection_dim > 0,
            "text_config.max_position_embeddings",
            "the text needs room for its start and end tokens, and projection_dim must be positive".into(),
        )
    }

    pub fn pooling(&self) -> Pooling {
        match self.text_config.eos_token_id {
            2 => Pooling::HighestId,
            id => Pooling::FirstOf(id),
        }
    }
}

impl TextConfig {
    pub fn encoder(&self) -> EncoderConfig {
        let sizes = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
        );
        EncoderConfig::of(sizes, self.layer_norm_eps, &self.hidden_act, Activation::QuickGelu)
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
        EncoderConfig::of(sizes, self.layer_norm_eps, &self.hidden_act, Activation::QuickGelu)
    }
}

mod defaults {
    pub fn projection_dim() -> usize {
        512
    }
    pub fn logit_scale_init_value() -> f32 {
        2.6592
    }
    pub fn text_vocab() -> usize {
        49408
    }
    pub fn text_hidden() -> usize {
        512
    }
    pub fn text_intermediate() -> usize {
        2048
    }
    pub fn layers() -> usize {
        12
    }
    pub fn text_heads() -> usize {
        8
    }
    pub fn text_positions() -> usize {
        77
    }
    pub fn act() -> String {
        "quick_gelu".into()
    }
    pub fn eps() -> f64 {
        1e-5
    }
    pub fn eos() -> u32 {
        49407
    }
    pub fn vision_hidden() -> usize {
        768
    }
    pub fn vision_intermediate() -> usize {
        3072
    }
    pub fn vision_heads() -> usize {
        12
    }
    pub fn channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> Result<ClipConfig, LoadError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        ClipConfig::load(&path)
    }

    #[test]
    fn defaults_are_vit_b_32_and_broken_fields_are_named() {
        let config = load("{}").unwrap();
        assert_eq!((config.vision_config.patch_size, config.projection_dim), (32, 512));
        assert_eq!(config.pooling(), Pooling::FirstOf(49407));
        let legacy = load(r#"{"text_config": {"eos_token_id": 2}}"#).unwrap();
        assert_eq!(legacy.pooling().position(&[5, 9, 3, 9]), 1);
        for (json, field) in [
            (r#"{"text_config": {"hidden_act": "relu"}}"#, "text_config.hidden_act"),
            (
                r#"{"vision_config": {"num_attention_heads": 5}}"#,
                "vision_config.num_attention_heads",
            ),
            (r#"{"vision_config": {"patch_size": 30}}"#, "vision_config.patch_size"),
        ] {
            let error = load(json).unwrap_err().to_string();
            assert!(error.contains(field), "{json}: {error}");
        }
    }
}
