//! config.json of SmolVLM (`Idefics3ForConditionalGeneration`) and SmolVLM2
//! (`SmolVLMForConditionalGeneration`). Missing optional fields take transformers'
//! defaults; fields Ocellus cannot honour are refused by name.

use std::path::Path;

use serde::Deserialize;

use crate::model::decoder::DecoderConfig;
use crate::model::error::LoadError;

/// A bound on the RoPE table Ocellus precomputes (2^20 positions).
const MAX_POSITIONS: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
pub struct SmolVlmConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "defaults::image_token_id")]
    pub image_token_id: u32,
    #[serde(default = "defaults::scale_factor")]
    pub scale_factor: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "defaults::vision_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::vision_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::vision_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::vision_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::vision_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every vision field has a default. This is a bug.")
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::text_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::text_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::text_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::text_heads")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::text_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4 writes `rope_theta` (+ `rope_scaling`), transformers 5 `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl TextConfig {
    /// The decoder's shape; its weights live under `model.text_model`.
    pub fn decoder(&self, tie_word_embeddings: bool) -> DecoderConfig {
        DecoderConfig {
            prefix: "model.text_model".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_kv_heads: self.num_kv_heads(),
            head_dim: self.head_dim(),
            rms_norm_eps: self.rms_norm_eps,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: false,
            tie_word_embeddings,
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }
}

impl SmolVlmConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let config: Self = crate::model::files::read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// What the rest of the server needs to know of the model.
    pub fn info(&self) -> crate::model::ModelInfo {
        crate::model::ModelInfo {
            architecture: self.architectures[0].clone(),
            image_token_ids: vec![self.image_token_id],
            vocab_size: self.text_config.vocab_size,
            max_positions: self.text_config.max_position_embeddings,
        }
    }

    /// Tokens per image tile after the pixel shuffle (64 for SmolVLM-256M).
    pub fn image_seq_len(&self) -> usize {
        let patches_per_side = self.vision_config.image_size / self.vision_config.patch_size;
        patches_per_side * patches_per_side / (self.scale_factor * self.scale_factor)
    }

    fn validate(&self, file: &Path) -> Result<(), LoadError> {
        // Which architectures load as SmolVLM is the registry's to say.
        if self.architectures.is_empty() {
            return Err(LoadError::invalid(file, "architectures", "is missing or empty"));
        }
        let rules = self.text_rules().into_iter().chain(self.vision_rules());
        if let Some((_, field, message)) = rules.into_iter().find(|(ok, _, _)| !ok) {
            return Err(LoadError::invalid(file, field, message));
        }
        let t = &self.text_config;
        for (field, rope) in [
            ("text_config.rope_parameters", &t.rope_parameters),
            ("text_config.rope_scaling", &t.rope_scaling),
        ] {
            let kind = rope.as_ref().and_then(|r| r.rope_type.as_deref()).unwrap_or("default");
            if kind != "default" {
                return Err(LoadError::invalid(
                    file,
                    field,
                    format!("rope type `{kind}` is not supported (only default)"),
                ));
            }
        }
        Ok(())
    }

    /// What the vision side needs: (holds, field, message otherwise).
    fn vision_rules(&self) -> [Rule; 6] {
        let v = &self.vision_config;
        [
            (
                v.hidden_size > 0,
                "vision_config.hidden_size",
                "must be positive, got 0".into(),
            ),
            (
                v.num_attention_heads > 0 && v.hidden_size.is_multiple_of(v.num_attention_heads),
                "vision_config.num_attention_heads",
                format!(
                    "must divide hidden_size {}, got {}",
                    v.hidden_size, v.num_attention_heads
                ),
            ),
            (
                v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
                "vision_config.patch_size",
                format!("must divide image_size {}, got {}", v.image_size, v.patch_size),
            ),
            (
                self.scale_factor > 0 && (v.image_size / v.patch_size.max(1)).is_multiple_of(self.scale_factor),
                "scale_factor",
                format!(
                    "must divide the patches per side {}, got {}",
                    v.image_size / v.patch_size.max(1),
                    self.scale_factor
                ),
            ),
            (
                matches!(v.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu"),
                "vision_config.hidden_act",
                format!("must be gelu_pytorch_tanh or gelu, got {}", v.hidden_act),
            ),
            (
                v.num_channels == 3,
                "vision_config.num_channels",
                format!("must be 3, got {}", v.num_channels),
            ),
        ]
    }

    /// What the text side needs: (holds, field, message otherwise).
    fn text_rules(&self) -> [Rule; 7] {
        let t = &self.text_config;
        [
            (
                t.num_attention_heads > 0,
                "text_config.num_attention_heads",
                "must be positive, got 0".into(),
            ),
            (
                t.hidden_size > 0,
                "text_config.hidden_size",
                "must be positive, got 0".into(),
            ),
            (
                t.max_position_embeddings <= MAX_POSITIONS,
                "text_config.max_position_embeddings",
                format!("must be <= {MAX_POSITIONS}, got {}", t.max_position_embeddings),
            ),
            (
                t.hidden_act == "silu",
                "text_config.hidden_act",
                format!("must be silu, got {}", t.hidden_act),
            ),
            (
                t.num_attention_heads > 0
                    && t.num_kv_heads() > 0
                    && t.num_attention_heads.is_multiple_of(t.num_kv_heads()),
                "text_config.num_key_value_heads",
                format!(
                    "must divide num_attention_heads {}, got {}",
                    t.num_attention_heads,
                    t.num_kv_heads()
                ),
            ),
            (
                t.head_dim().is_multiple_of(2) && t.head_dim() > 0,
                "text_config.head_dim",
                format!("must be even and positive, got {}", t.head_dim()),
            ),
            (
                (self.image_token_id as usize) < t.vocab_size,
                "image_token_id",
                format!(
                    "must be below text_config.vocab_size {}, got {}",
                    t.vocab_size, self.image_token_id
                ),
            ),
        ]
    }
}

/// A config rule: whether it holds, the field, and the message when it does not.
type Rule = (bool, &'static str, String);

mod defaults {
    // transformers' defaults (Idefics3Config / SmolVLMConfig, their vision config, LlamaConfig).
    pub fn image_token_id() -> u32 {
        128_257
    }
    pub fn scale_factor() -> usize {
        2
    }
    pub fn vision_hidden_size() -> usize {
        1152
    }
    pub fn vision_intermediate_size() -> usize {
        3072
    }
    pub fn vision_layers() -> usize {
        12
    }
    pub fn vision_heads() -> usize {
        16
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn vision_act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-6
    }
    pub fn vocab_size() -> usize {
        32_000
    }
    pub fn text_hidden_size() -> usize {
        4096
    }
    pub fn text_intermediate_size() -> usize {
        11_008
    }
    pub fn text_layers() -> usize {
        32
    }
    pub fn text_heads() -> usize {
        32
    }
    pub fn text_act() -> String {
        "silu".into()
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
}
