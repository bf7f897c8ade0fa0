//! `ocellus finetune --method dpo`: on the fixture model and preference pairs made from the
//! colours set (chosen: the image's colour; rejected: another one), the first step's loss is
//! exactly ln 2 (policy and reference agree), training raises the chosen completion over the
//! rejected one on held-out pairs, LoRA and full, and broken pairs stop with their line.

mod common;

use std::path::{Path, PathBuf};

use clap::Parser;
use common::*;
use ocellus::config::{Cli, Command, FinetuneArgs};
use serde_json::{Value, json};

const MODEL: &str = "tiny-idefics3";

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ocellus-dpo-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The colours set's conversations as pairs: the answer chosen, the next colour of the set
/// rejected; images by absolute path.
fn pairs(split: &str, out: &Path) -> PathBuf {
    let folder = fixtures().join("finetune").join("colours");
    let text = std::fs::read_to_string(folder.join(format!("{split}.jsonl"))).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut colours: Vec<String> = lines
        .iter()
        .map(|l| l["messages"][1]["content"].as_str().unwrap().into())
        .collect();
    colours.sort();
    colours.dedup();
    assert!(colours.len() > 1, "{colours:?}");
    let mut written = String::new();
    for line in &lines {
        let mut prompt = line["messages"][0].clone();
        let image = &mut prompt["content"][0]["image_url"]["url"];
        *image = json!(folder.join(image.as_str().unwrap()).to_str().unwrap());
        let answer = line["messages"][1]["content"].as_str().unwrap();
        let next = &colours[(colours.iter().position(|c| c == answer).unwrap() + 1) % colours.len()];
        let pair = json!({"prompt": [prompt], "chosen": answer, "rejected": [{"role": "assistant", "content": next}]});
        written.push_str(&format!("{pair}\n"));
    }
    let file = out.join(format!("{split}-pairs.jsonl"));
    std::fs::write(&file, written).unwrap();
    file
}

fn args(out: &Path, extra: &[&str]) -> FinetuneArgs {
    let model = Reference::model_dir(&fixtures(), MODEL);
    let (train, eval) = (pairs("train", out), pairs("eval", out));
    let mut argv = vec![
        "ocellus",
        "finetune",
        "--method",
        "dpo",
        "--model",
        model.to_str().unwrap(),
    ];
    argv.extend(["--data", train.to_str().unwrap(), "--eval", eval.to_str().unwrap()]);
    let adapter = out.join("out");
    argv.extend(["--out", adapter.to_str().unwrap(), "--lora-dropout", "0"]);
    argv.extend(extra);
    match Cli::parse_from(argv).command {
        Command::Finetune(args) => args,
        _ => unreachable!(),
    }
}

fn trains_the_chosen_answer_up(name: &str, flags: &[&str]) {
    let out = scratch(name);
    let mut all = vec!["--max-steps", "24"];
    all.extend(flags);
    let summary = ocellus::train::finetune(&args(&out, &all)).unwrap();
    let first = summary.preference[0];
    // The policy starts as the reference: every reward 0, the loss -log sigmoid(0).
    assert!(
        (summary.first_loss - std::f64::consts::LN_2).abs() < 1e-5,
        "{}",
        summary.first_loss
    );
    assert_eq!((first.chosen_rewards, first.margin, first.accuracy), (0.0, 0.0, 0.0));
    let (before, after) = (summary.eval_losses[0], *summary.eval_losses.last().unwrap());
    let last = summary.preference.last().unwrap();
    eprintln!("{name}: eval loss {before:.4} -> {after:.4}; last step {last}");
    assert!((before - std::f64::consts::LN_2).abs() < 1e-5, "{before}");
    assert!(after < 0.6, "eval loss {before} -> {after}");
    assert!(last.margin > 0.0, "{last}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn lora_dpo_raises_the_chosen_answer_over_the_rejected_one() {
    trains_the_chosen_answer_up("lora", &["--lr", "2e-3"]);
}

#[test]
fn full_dpo_raises_the_chosen_answer_over_the_rejected_one() {
    trains_the_chosen_answer_up("full", &["--dpo-weights", "full", "--lr", "1e-4"]);
}

#[test]
fn dpo_with_a_lora_on_the_vision_tower_starts_from_the_reference_and_raises_the_chosen_answer() {
    // The reference is the model before any step: with the vision pairs' B at 0 its image
    // features are the base model's, so the first loss is -log sigmoid(0) exactly.
    let targets = "vision.q_proj,vision.v_proj,vision.fc1,connector,q_proj,v_proj,down_proj";
    trains_the_chosen_answer_up("lora-vision", &["--lr", "2e-3", "--lora-target-modules", targets]);
}

#[test]
fn broken_pairs_stop_with_an_error_naming_the_line() {
    let out = scratch("broken");
    let good = r#"{"prompt": "Say a colour.", "chosen": "red.", "rejected": "blue."}"#;
    let cases = [
        (
            r#"{"prompt": "Say a colour.", "chosen": "red."}"#,
            "no column `rejected`",
        ),
        (
            r#"{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], "chosen": "red.", "rejected": "blue."}"#,
            "`prompt` has 1 image placeholders but the row has 0 images",
        ),
        (
            r#"{"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "blue."}"#,
            "`chosen[0]`: a completion holds assistant messages only",
        ),
        ("[1, 2]", "not a JSON object"),
    ];
    for (bad, expected) in cases {
        let file = out.join("pairs.jsonl");
        std::fs::write(&file, format!("{good}\n{bad}\n")).unwrap();
        let mut args = args(&out, &[]);
        args.data = file.clone();
        args.eval = None;
        let error = ocellus::train::finetune(&args).unwrap_err().to_string();
        assert!(
            error.contains("pairs.jsonl: line 2:") && error.contains(expected),
            "{bad}: {error}"
        );
    }
    std::fs::remove_dir_all(out).unwrap();
}

/// The flags of one of `scripts/fixtures_dpo.py`'s runs, writing to `target`.
fn trl_run_args(run: &Value, target: &Path) -> FinetuneArgs {
    let dpo = fixtures().join("finetune/dpo");
    let model = Reference::model_dir(&fixtures(), MODEL);
    let (data, init) = (dpo.join("pairs.jsonl"), dpo.join("init-lora"));
    let lr = run["lr"].as_f64().unwrap().to_string();
    let weights = run["weights"].as_str().unwrap();
    let sft = run["sft_weight"].as_f64().unwrap().to_string();
    let mut argv = vec!["ocellus", "finetune", "--method", "dpo", "--dpo-weights", weights];
    argv.extend(["--sft-weight", &sft, "--model", model.to_str().unwrap()]);
    argv.extend(["--data", data.to_str().unwrap(), "--out", target.to_str().unwrap()]);
    argv.extend([
        "--lr",
        &lr,
        "--beta",
        "0.1",
        "--batch-size",
        "4",
        "--epochs",
        "20",
        "--max-steps",
        "20",
    ]);
    if weights == "lora" {
        argv.extend([
            "--lora-init",
            init.to_str().unwrap(),
            "--lora-r",
            "8",
            "--lora-alpha",
            "16",
        ]);
        argv.extend(["--lora-dropout", "0"]);
    }
    let Command::Finetune(args) = Cli::parse_from(argv).command else {
        unreachable!()
    };
    args
}

/// `scripts/fixtures_dpo.py`'s runs: TRL's DPOTrainer, 20 steps of the four pairs at once.
#[test]
fn twenty_steps_log_what_trl_logs_lora_full_and_lora_with_the_sft_term() {
    let text = std::fs::read_to_string(fixtures().join("reference/tiny-idefics3-dpo.json")).unwrap();
    let reference: Value = serde_json::from_str(&text).unwrap();
    let dpo = fixtures().join("finetune/dpo");
    for (name, run) in reference["runs"].as_object().unwrap() {
        let out = scratch(&format!("trl-{name}"));
        let target = out.join("out");
        let args = trl_run_args(run, &target);
        let summary = ocellus::train::finetune(&args).unwrap();
        let steps = run["steps"].as_array().unwrap();
        assert_eq!(
            (summary.losses.len(), summary.preference.len()),
            (steps.len(), steps.len())
        );
        let mut worst = 0f64;
        for (i, trl) in steps.iter().enumerate() {
            let ours = summary.preference[i];
            let pairs = [
                ("loss", summary.losses[i], 1e-4),
                ("rewards/chosen", ours.chosen_rewards, 1e-4),
                ("rewards/rejected", ours.rejected_rewards, 1e-4),
                ("rewards/accuracies", ours.accuracy, 1e-4),
                ("rewards/margins", ours.margin, 1e-4),
                ("logps/chosen", ours.chosen_logps, 1e-3),
                ("logps/rejected", ours.rejected_logps, 1e-3),
            ];
            for (key, value, tolerance) in pairs {
                let expected = trl[key].as_f64().unwrap();
                worst = worst.max((value - expected).abs() * if key.starts_with("logps") { 0.0 } else { 1.0 });
                assert!(
                    (value - expected).abs() <= tolerance,
                    "{name} step {}: {key} {value} against TRL's {expected}",
                    i + 1
                );
            }
        }
        eprintln!("{name}: largest difference from TRL in loss, rewards, accuracy, margin: {worst:.2e}");
        if name == "lora" {
            // The adapter written in PEFT's format holds TRL's trained weights.
            let load = |dir: &Path| {
                candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)
                    .unwrap()
            };
            let (trl, ours) = (load(&dpo.join("trl-lora")), load(&target));
            assert_eq!(trl.len(), ours.len());
            for (key, theirs) in &trl {
                let diff = max_abs_diff(
                    &theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    &ours[key].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(diff < 1e-4, "{key}: {diff}");
            }
        }
        std::fs::remove_dir_all(out).unwrap();
    }
}
