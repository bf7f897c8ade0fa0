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

/// The modules a LoRA may target, as `--lora-target-modules` names them
/// (`layers::target_name`): the text projections by their last name, the vision encoder's
/// under `vision.`, and the connector's projection.
pub const LORA_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
    "vision.q_proj",
    "vision.k_proj",
    "vision.v_proj",
    "vision.out_proj",
    "vision.fc1",
    "vision.fc2",
    "connector",
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

/// PEFT's `target_modules` as one full-match pattern over the modules the targets name
/// (`layers::target_name`): a plain list would match the text model's q/k/v in the vision
/// tower too, and `vision.q_proj` is no module name.
fn target_regex(targets: &[String]) -> String {
    let mut alternatives = Vec::new();
    let attention = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"];
    let towers = [
        ("", r"model\.text_model\.layers"),
        ("vision.", r"model\.vision_model\.encoder\.layers"),
    ];
    for (tower, layers) in towers {
        let names: Vec<&str> = (targets.iter())
            .filter_map(|t| t.strip_prefix(tower))
            .filter(|t| !t.contains('.') && *t != "lm_head" && *t != "connector")
            .collect();
        let (attn, mlp): (Vec<&str>, Vec<&str>) = names.iter().partition(|t| attention.contains(t));
        if !attn.is_empty() {
            alternatives.push(format!(r"{layers}\.\d+\.self_attn\.({})", attn.join("|")));
        }
        if !mlp.is_empty() {
            alternatives.push(format!(r"{layers}\.\d+\.mlp\.({})", mlp.join("|")));
        }
    }
    if targets.iter().any(|t| t == "connector") {
        alternatives.push(r"model\.connector\.modality_projection\.proj".into());
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
            "model.connector.modality_projection.proj",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }

    #[test]
    fn the_target_pattern_matches_the_vision_projections_and_connector_named() {
        let targets: Vec<String> = ["q_proj", "vision.q_proj", "vision.out_proj", "vision.fc1", "connector"]
            .map(String::from)
            .to_vec();
        let re = regex::Regex::new(&target_regex(&targets)).unwrap();
        for yes in [
            "model.text_model.layers.0.self_attn.q_proj",
            "model.vision_model.encoder.layers.0.self_attn.q_proj",
            "model.vision_model.encoder.layers.11.self_attn.out_proj",
            "model.vision_model.encoder.layers.3.mlp.fc1",
            "model.connector.modality_projection.proj",
        ] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "model.vision_model.encoder.layers.0.self_attn.k_proj",
            "model.vision_model.encoder.layers.0.mlp.fc2",
            "model.vision_model.embeddings.patch_embedding",
            "model.text_model.layers.0.mlp.fc1",
            "lm_head",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }
}
