//! What fine-tuning writes: a LoRA adapter in PEFT's format (so that
//! `PeftModel.from_pretrained` and `--lora` both load it), or under `--method full` a whole
//! model folder in the Hugging Face layout with the trained text weights in place.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;

use super::text::{LoraSpec, Trainable};
use crate::model::ModelFiles;
use crate::model::lora::{CONFIG_FILE, WEIGHTS_FILE};

/// The text projections a LoRA may target, by their last name.
pub const LORA_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

/// A safetensors file readable by others, as the folder's other files are: the safetensors
/// crate creates its files owner-only (0600), and a server running as another user (a
/// container's) could not load the adapter or model a run wrote.
fn write_tensors(tensors: &HashMap<String, Tensor>, file: &Path) -> anyhow::Result<()> {
    candle_core::safetensors::save(tensors, file).with_context(|| file.display().to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644))
            .with_context(|| file.display().to_string())?;
    }
    Ok(())
}

/// `adapter_config.json` and `adapter_model.safetensors` in `dir`.
pub fn save_adapter(dir: &Path, spec: &LoraSpec, base_model: &str, trainables: &[Trainable]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let tensors: HashMap<String, Tensor> = (trainables.iter())
        .map(|t| (t.name.clone(), t.var.as_tensor().clone()))
        .collect();
    write_tensors(&tensors, &dir.join(WEIGHTS_FILE))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout.to_string().parse::<f64>().unwrap_or(0.0),
        // A regular expression, which PEFT matches against whole module names: a plain list
        // would also match the vision tower's q/k/v/out projections.
        "target_modules": target_regex(&spec.targets),
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let file = dir.join(CONFIG_FILE);
    std::fs::write(&file, serde_json::to_string_pretty(&config)? + "\n").with_context(|| file.display().to_string())?;
    Ok(())
}

/// PEFT's `target_modules` as one full-match pattern over the text model's projections.
fn target_regex(targets: &[String]) -> String {
    let mut alternatives = Vec::new();
    let layer: Vec<&str> = (targets.iter().map(String::as_str))
        .filter(|t| *t != "lm_head")
        .collect();
    let attn: Vec<&str> = (layer.iter().copied())
        .filter(|t| ["q_proj", "k_proj", "v_proj", "o_proj"].contains(t))
        .collect();
    let mlp: Vec<&str> = layer.iter().copied().filter(|t| !attn.contains(t)).collect();
    if !attn.is_empty() {
        alternatives.push(format!(
            r"model\.text_model\.layers\.\d+\.self_attn\.({})",
            attn.join("|")
        ));
    }
    if !mlp.is_empty() {
        alternatives.push(format!(r"model\.text_model\.layers\.\d+\.mlp\.({})", mlp.join("|")));
    }
    if targets.iter().any(|t| t == "lm_head") {
        alternatives.push("lm_head".into());
    }
    format!("^({})$", alternatives.join("|"))
}

/// A model folder: the base folder's files, and one safetensors file with every tensor,
/// the trained ones replaced.
pub fn save_full(dir: &Path, base: &ModelFiles, trainables: &[Trainable]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let mut tensors = HashMap::new();
    for file in &base.weights {
        let loaded = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
            .with_context(|| file.display().to_string())?;
        tensors.extend(loaded);
    }
    for t in trainables {
        let original = tensors
            .get(&t.name)
            .map(|o| o.dtype())
            .unwrap_or(candle_core::DType::F32);
        tensors.insert(t.name.clone(), t.var.as_tensor().to_dtype(original)?);
    }
    write_tensors(&tensors, &dir.join("model.safetensors"))?;
    for entry in std::fs::read_dir(&base.dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if path.is_file() && !name.ends_with(".safetensors") && name != "model.safetensors.index.json" {
            std::fs::copy(&path, dir.join(&name)).with_context(|| path.display().to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_pattern_matches_text_projections_only() {
        let targets: Vec<String> = ["q_proj", "v_proj", "down_proj", "lm_head"].map(String::from).to_vec();
        let re = regex::Regex::new(&target_regex(&targets)).unwrap();
        for yes in [
            "model.text_model.layers.0.self_attn.q_proj",
            "model.text_model.layers.11.mlp.down_proj",
            "lm_head",
        ] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "model.vision_model.encoder.layers.0.self_attn.q_proj",
            "model.text_model.layers.0.self_attn.k_proj",
            "model.text_model.layers.0.mlp.up_proj",
            "model.text_model.layers.0.self_attn.q_proj.lora_A",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }
}
