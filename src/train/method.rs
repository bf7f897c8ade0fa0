//! What a run trains, from its flags: the method (LoRA's rank, targets and QLoRA, or every
//! weight), whether the vision side trains, and whether layers are checkpointed.

use crate::config::{DpoWeights, FinetuneArgs, FinetuneMethod};

use super::layers;
use super::save;
use super::text::{LoraSpec, Method};

/// Whether the vision encoder and connector have trainable weights: every weight, or a LoRA
/// targeting them.
pub(super) fn trains_vision(method: &Method) -> bool {
    match method {
        Method::Full => true,
        Method::Lora(spec) => layers::targets_vision(spec),
    }
}

/// The method `--method` and the LoRA flags describe, checked.
pub(super) fn method(args: &FinetuneArgs) -> anyhow::Result<Method> {
    let every_weight = match args.method {
        FinetuneMethod::Contrastive => {
            anyhow::bail!("--method contrastive trains embedding models (train::contrastive)")
        }
        FinetuneMethod::Full => true,
        FinetuneMethod::Lora => false,
        FinetuneMethod::Dpo => {
            anyhow::ensure!(args.beta > 0.0 && args.beta.is_finite(), "--beta must be above 0");
            args.dpo_weights == DpoWeights::Full
        }
    };
    if every_weight {
        anyhow::ensure!(
            args.quantize.is_none(),
            "--quantize keeps a frozen base: it applies to LoRA runs, not every weight"
        );
        return Ok(Method::Full);
    }
    anyhow::ensure!(args.lora_r > 0, "--lora-r must be at least 1");
    anyhow::ensure!(
        (0.0..1.0).contains(&args.lora_dropout),
        "--lora-dropout must be in [0, 1)"
    );
    for t in &args.lora_target_modules {
        anyhow::ensure!(
            save::LORA_MODULES.contains(&t.as_str()),
            "--lora-target-modules: `{t}` is not one of {}",
            save::LORA_MODULES.join(", ")
        );
    }
    Ok(Method::Lora(LoraSpec {
        rank: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_target_modules.clone(),
        quantize_base: args.quantize.is_some(),
    }))
}

/// Whether layers are checkpointed: `--gradient-checkpointing`, or under `--quantize` unless
/// `--no-gradient-checkpointing` (QLoRA is for memory; PEFT's `prepare_model_for_kbit_training`
/// turns checkpointing on too). At batch 4 on SmolVLM-256M's shapes the activations, not the
/// weights, are most of the peak: q8_0 alone came to 0.86x of the f32 base, with
/// checkpointing 0.28x, at the same tokens/s (`scripts/bench_finetune.sh`).
pub(super) fn checkpointing(args: &FinetuneArgs) -> bool {
    args.gradient_checkpointing || (args.quantize.is_some() && !args.no_gradient_checkpointing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_runs_checkpoint_their_layers_unless_told_not_to() {
        use clap::Parser;
        let parse = |flags: &[&str]| {
            let mut argv = vec!["ocellus", "finetune", "--model", "m", "--data", "d", "--out", "o"];
            argv.extend(flags);
            match crate::config::Cli::parse_from(argv).command {
                crate::config::Command::Finetune(args) => checkpointing(&args),
                _ => unreachable!(),
            }
        };
        assert!(!parse(&[]));
        assert!(parse(&["--gradient-checkpointing"]));
        assert!(parse(&["--quantize", "q8_0"]));
        assert!(!parse(&["--quantize", "q8_0", "--no-gradient-checkpointing"]));
        assert!(
            parse(&["--no-gradient-checkpointing", "--gradient-checkpointing"]),
            "the last one holds"
        );
        assert!(!parse(&["--gradient-checkpointing", "--no-gradient-checkpointing"]));
    }
}
