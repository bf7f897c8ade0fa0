//! config.json of Qwen3-VL (`Qwen3VLForConditionalGeneration`), as the hub writes it
//! (transformers 4.57: `rope_theta` and `rope_scaling`) or transformers 5 saves it
//! (`rope_parameters`). Fields Ocellus cannot honour are refused by name.

use std::path::Path;

use serde::Deserialize;

use crate::model::decoder::DecoderConfig;
use crate::model::error::LoadError;

#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3VlConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "defaults::image_token_id")]
    pub image_token_id: u32,
    #[serde(default = "defaults::video_token_id")]
    pub video_token_id: u32,
    #[serde(default = "defaults::vision_start_token_id")]
    pub vision_start_token_id: u32,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    pub vision_config: VisionConfig,
    pub text_config: TextConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
    #[serde(default = "defaults::vision_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
    #[serde(default)]
    pub mrope_interleaved: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::text_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// The MoE variant's fields: present, the folder is `Qwen3VLMoe` under another name.
    #[serde(default)]
    pub num_experts: Option<usize>,
}

mod defaults {
    pub fn image_token_id() -> u32 {
        151655
    }
    pub fn video_token_id() -> u32 {
        151656
    }
    pub fn vision_start_token_id() -> u32 {
        151652
    }
    pub fn in_channels() -> usize {
        3
    }
    pub fn vision_act() -> String {
        "gelu_pytorch_tanh".into()
    }
    pub fn text_act() -> String {
        "silu".into()
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
}

impl TextConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size.checked_div(self.num_attention_heads).unwrap_or(0))
    }

    fn rope(&self) -> Option<&RopeParameters> {
        self.rope_parameters.as_ref().or(self.rope_scaling.as_ref())
    }

    /// transformers' default for Qwen3-VL's text model is 500000 (`default_theta`).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(500_000.0)
    }

    /// How many of RoPE's frequencies follow time, rows and columns (`[24, 20, 20]`).
    pub fn mrope_section(&self) -> [usize; 3] {
        let section = self.rope().and_then(|r| r.mrope_section.clone());
        match section.as_deref() {
            Some(&[t, h, w]) => [t, h, w],
            _ => [24, 20, 20],
        }
    }
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Inputs of the patch embedding: channels × frames × rows × columns of one patch.
    pub fn patch_values(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// (holds, field, message otherwise)
type Rule = (bool, &'static str, String);

impl Qwen3VlConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let config: Self = crate::model::files::read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings
            .or(self.text_config.tie_word_embeddings)
            .unwrap_or(false)
    }

    pub fn info(&self) -> crate::model::ModelInfo {
        crate::model::ModelInfo {
            architecture: self.architectures[0].clone(),
            image_token_ids: vec![self.image_token_id, self.video_token_id],
            vocab_size: self.text_config.vocab_size,
            max_positions: self.text_config.max_position_embeddings,
        }
    }

    pub fn decoder(&self) -> DecoderConfig {
        let t = &self.text_config;
        DecoderConfig {
            prefix: "model.language_model".into(),
            vocab_size: t.vocab_size,
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            num_kv_heads: t.num_kv_heads(),
            head_dim: t.head_dim(),
            rms_norm_eps: t.rms_norm_eps,
            attention_bias: t.attention_bias,
            mlp_bias: false,
            qk_norm: true,
            tie_word_embeddings: self.tie_word_embeddings(),
        }
    }

    fn validate(&self, file: &Path) -> Result<(), LoadError> {
        if self.architectures.is_empty() {
            return Err(LoadError::invalid(file, "architectures", "is missing or empty"));
        }
        let rules = self.text_rules().into_iter().chain(self.vision_rules());
        if let Some((_, field, message)) = rules.into_iter().find(|(ok, _, _)| !ok) {
            return Err(LoadError::invalid(file, field, message));
        }
        self.validate_rope(file)
    }

    fn validate_rope(&self, file: &Path) -> Result<(), LoadError> {
        let t = &self.text_config;
        let field = match t.rope_parameters {
            Some(_) => "text_config.rope_parameters",
            None => "text_config.rope_scaling",
        };
        let rope = t.rope();
        let kind = rope.and_then(|r| r.rope_type.as_deref()).unwrap_or("default");
        if kind != "default" {
            let message = format!("rope type `{kind}` is not supported (only default M-RoPE)");
            return Err(LoadError::invalid(file, field, message));
        }
        if rope.and_then(|r| r.mrope_interleaved) == Some(false) {
            let message =
                "mrope_interleaved false (Qwen2-VL's sectioned M-RoPE) is not supported; Qwen3-VL interleaves";
            return Err(LoadError::invalid(file, field, message));
        }
        let section = t.mrope_section();
        let half = t.head_dim() / 2;
        let fits = section.iter().sum::<usize>() == half && section[1] * 3 <= half && section[2] * 3 <= half;
        if !fits {
            let message = format!(
                "mrope_section {section:?} must sum to head_dim / 2 = {half}, each of rows and columns at most a third of it"
            );
            return Err(LoadError::invalid(file, field, message));
        }
        Ok(())
    }

    fn vision_rules(&self) -> [Rule; 7] {
        let v = &self.vision_config;
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        [
            (
                v.hidden_size > 0 && v.num_heads > 0 && v.hidden_size.is_multiple_of(v.num_heads),
                "vision_config.num_heads",
                format!("must divide hidden_size {}, got {}", v.hidden_size, v.num_heads),
            ),
            (
                v.head_dim().is_multiple_of(4),
                "vision_config.hidden_size",
                format!(
                    "hidden_size / num_heads must be a multiple of 4 (2-D RoPE), got {}",
                    v.head_dim()
                ),
            ),
            (
                v.patch_size > 0 && v.temporal_patch_size > 0,
                "vision_config.patch_size",
                "patch sizes must be positive".into(),
            ),
            (
                v.spatial_merge_size > 0,
                "vision_config.spatial_merge_size",
                "must be positive, got 0".into(),
            ),
            (
                side > 0 && side * side == v.num_position_embeddings,
                "vision_config.num_position_embeddings",
                format!("must be a square grid, got {}", v.num_position_embeddings),
            ),
            (
                v.deepstack_visual_indexes.iter().all(|&i| i < v.depth)
                    && v.deepstack_visual_indexes.len() <= self.text_config.num_hidden_layers,
                "vision_config.deepstack_visual_indexes",
                format!(
                    "must name vision layers below depth {} and be no more than the decoder's layers, got {:?}",
                    v.depth, v.deepstack_visual_indexes
                ),
            ),
            (
                v.hidden_act == "gelu_pytorch_tanh",
                "vision_config.hidden_act",
                format!("must be gelu_pytorch_tanh, got {}", v.hidden_act),
            ),
        ]
    }

    fn text_rules(&self) -> [Rule; 5] {
        let t = &self.text_config;
        [
            (
                t.num_experts.is_none(),
                "text_config.num_experts",
                "is set: this is a mixture-of-experts model (Qwen3VLMoe), which Ocellus does not run yet".into(),
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
                t.head_dim() > 0 && t.head_dim().is_multiple_of(2),
                "text_config.head_dim",
                format!("must be positive and even, got {}", t.head_dim()),
            ),
            (
                t.hidden_act == "silu",
                "text_config.hidden_act",
                format!("must be silu, got {}", t.hidden_act),
            ),
            (
                self.vision_config.out_hidden_size == t.hidden_size,
                "vision_config.out_hidden_size",
                format!(
                    "must equal text_config.hidden_size {}, got {}",
                    t.hidden_size, self.vision_config.out_hidden_size
                ),
            ),
        ]
    }
}
