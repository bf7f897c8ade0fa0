//! PEFT's `adapter_config.json`, as far as serving a LoRA adapter needs it: the rank and
//! alpha of each module (with `rank_pattern` and `alpha_pattern`), rsLoRA's scaling, and
//! every option that changes what the weights mean, which is refused by name rather than
//! silently served wrong.

use std::path::Path;

use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::AdapterError;

#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub peft_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: Patterns,
    pub alpha_pattern: Patterns,
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    /// PEFT's `LoraConfig` defaults.
    fn default() -> Self {
        Self {
            peft_type: None,
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            base_model_name_or_path: None,
        }
    }
}

/// Options that, when set, make the saved weights mean something a plain `W x + s B A x`
/// does not compute (DoRA's magnitudes, LoRA biases, extra trained modules or tokens,
/// transposed weights, ...). PEFT leaves them null, false or empty when unused.
const UNSUPPORTED: &[&str] = &[
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "alora_invocation_tokens",
    "layer_replication",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
];

impl LoraConfig {
    pub fn load(file: &Path) -> Result<Self, AdapterError> {
        let text = std::fs::read_to_string(file).map_err(|source| AdapterError::Io {
            file: file.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| AdapterError::Config {
            file: file.to_path_buf(),
            message,
        };
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let fields = raw.as_object().ok_or_else(|| invalid("not a JSON object".into()))?;
        for &name in UNSUPPORTED {
            if fields.get(name).is_some_and(is_set) {
                return Err(AdapterError::Unsupported {
                    file: file.to_path_buf(),
                    feature: format!("`{name}`: {}", fields[name]),
                });
            }
        }
        if let Some(bias) = fields
            .get("bias")
            .filter(|b| !b.is_null() && b.as_str() != Some("none"))
        {
            return Err(AdapterError::Unsupported {
                file: file.to_path_buf(),
                feature: format!("`bias`: {bias} (only \"none\")"),
            });
        }
        let config: Self = serde_json::from_value(raw).map_err(|e| invalid(e.to_string()))?;
        match config.peft_type.as_deref() {
            None | Some("LORA") => {}
            Some(other) => {
                return Err(AdapterError::Unsupported {
                    file: file.to_path_buf(),
                    feature: format!("`peft_type`: {other} (only LORA)"),
                });
            }
        }
        if config.r == 0 {
            return Err(invalid("field `r`: must be at least 1".into()));
        }
        Ok(config)
    }

    /// The rank PEFT gives `module` (its name in the base model, e.g.
    /// `model.text_model.layers.1.self_attn.q_proj`).
    pub fn rank(&self, module: &str) -> usize {
        self.rank_pattern.find(module).map_or(self.r, |r| r as usize)
    }

    /// The factor PEFT multiplies `B A x` by in `module` of rank `rank`.
    pub fn scale(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_pattern.find(module).unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// Whether a config value turns its option on: anything but null, false, 0 and empty.
fn is_set(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Bool(true) => true,
    }
}

/// `rank_pattern` / `alpha_pattern`: module-name patterns in file order, because PEFT takes
/// the first that matches (`peft.utils.other.get_pattern_key`).
#[derive(Debug, Default)]
pub struct Patterns(Vec<(regex::Regex, f64)>);

impl Patterns {
    fn find(&self, module: &str) -> Option<f64> {
        self.0.iter().find(|(re, _)| re.is_match(module)).map(|(_, v)| *v)
    }
}

impl<'de> Deserialize<'de> for Patterns {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = Patterns;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of module patterns to numbers")
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<Patterns, E> {
                Ok(Patterns::default())
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Patterns, A::Error> {
                let mut patterns = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, f64>()? {
                    // PEFT: re.match(rf"(.*\.)?({key})$", name)
                    let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                        .map_err(|e| serde::de::Error::custom(format!("pattern `{key}`: {e}")))?;
                    patterns.push((re, value));
                }
                Ok(Patterns(patterns))
            }
        }
        deserializer.deserialize_any(InOrder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> LoraConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn patterns_match_whole_dotted_suffixes_first_one_wins() {
        let c = config(
            r#"{"r": 8, "lora_alpha": 16,
                "rank_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 4},
                "alpha_pattern": {"v_proj": 32}}"#,
        );
        assert_eq!(c.rank("model.text_model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank("model.text_model.layers.0.self_attn.q_proj"), 4);
        // a suffix must start at a dot: `layers.11` is not `layers.1`
        assert_eq!(c.rank("model.text_model.layers.11.self_attn.q_proj"), 4);
        assert_eq!(c.rank("model.text_model.layers.1.self_attn.k_proj"), 8);
        assert_eq!(c.scale("model.text_model.layers.0.self_attn.v_proj", 8), 4.0);
        assert_eq!(c.scale("model.text_model.layers.0.self_attn.q_proj", 4), 4.0);
    }

    #[test]
    fn rslora_divides_by_the_square_root_of_the_rank() {
        let c = config(r#"{"r": 4, "lora_alpha": 4, "use_rslora": true}"#);
        assert_eq!(c.scale("lm_head", 4), 2.0);
        assert_eq!(config(r#"{"rank_pattern": null}"#).rank("x"), 8);
    }

    #[test]
    fn options_that_change_the_weights_meaning_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("ocellus-lora-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("adapter_config.json");
        for (json, named) in [
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"modules_to_save": ["classifier"]}"#, "modules_to_save"),
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"peft_type": "IA3"}"#, "peft_type"),
        ] {
            std::fs::write(&file, json).unwrap();
            let err = LoraConfig::load(&file).unwrap_err();
            assert!(matches!(err, AdapterError::Unsupported { .. }), "{json}: {err}");
            assert!(err.to_string().contains(named), "{err}");
        }
        std::fs::write(
            &file,
            r#"{"use_dora": false, "modules_to_save": null, "bias": "none", "r": 2}"#,
        )
        .unwrap();
        assert_eq!(LoraConfig::load(&file).unwrap().r, 2);
        std::fs::write(&file, r#"{"r": "eight"}"#).unwrap();
        assert!(matches!(LoraConfig::load(&file), Err(AdapterError::Config { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
