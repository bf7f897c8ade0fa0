//! `ocellus finetune`: the training forward computes transformers' logits (with a PEFT
//! adapter in place too), a short LoRA run on the fixture lowers the eval loss and writes an
//! adapter the server loads, a resumed run ends where an unbroken one does, and broken
//! datasets stop with an error naming the line.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp};
use clap::Parser;
use common::*;
use ocellus::config::{Cli, Command, FinetuneArgs};
use ocellus::model::lora::Adapter;
use ocellus::model::smolvlm::SmolVlmConfig;
use ocellus::model::weights::SafetensorsWeights;
use ocellus::train::data::{self, DataError, DataLimits};
use ocellus::train::dataset::{Dataset, Location};
use ocellus::train::layers::Builder;
use ocellus::train::text::{LoraSpec, Method, TrainText};
use ocellus::train::vision::TrainVision;

const MODEL: &str = "tiny-idefics3";

fn colours() -> PathBuf {
    fixtures().join("finetune").join("colours")
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ocellus-finetune-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ocellus finetune` flags on the fixture model and the colours set.
fn args(out: &Path, extra: &[&str]) -> FinetuneArgs {
    let model = Reference::model_dir(&fixtures(), MODEL);
    let data = colours().join("train.jsonl");
    let eval = colours().join("eval.jsonl");
    let mut argv = vec!["ocellus", "finetune", "--model", model.to_str().unwrap()];
    argv.extend(["--data", data.to_str().unwrap(), "--eval", eval.to_str().unwrap()]);
    argv.extend(["--out", out.to_str().unwrap()]);
    argv.extend(extra);
    match Cli::parse_from(argv).command {
        Command::Finetune(args) => args,
        _ => unreachable!(),
    }
}

/// A LoRA spec for a fixture adapter's modules (rank and alpha as it was trained).
fn lora(rank: usize, alpha: f64, targets: &[&str]) -> Method {
    Method::Lora(LoraSpec {
        rank,
        alpha,
        dropout: 0.0,
        targets: targets.iter().map(|t| t.to_string()).collect(),
        quantize_base: false,
    })
}

#[test]
fn the_training_forward_gives_transformers_logits_with_and_without_a_peft_adapter_vision_included() {
    let loaded = load_fixture_model(MODEL);
    let dir = Reference::model_dir(&fixtures(), MODEL);
    let config = SmolVlmConfig::load(&dir.join("config.json")).unwrap();
    // Every text projection of every layer, not the head; every vision projection and the
    // connector, the text model untouched.
    let text = &ocellus::train::save::LORA_MODULES[..7];
    let vision = &ocellus::train::save::LORA_MODULES[8..];
    for (method, adapter) in [
        (Method::Full, None),
        (lora(4, 8.0, text), Some("all-linear-r4")),
        (lora(4, 8.0, vision), Some("vision-r4")),
    ] {
        let reference = match adapter {
            Some(name) => Reference::load(&fixtures(), &format!("{MODEL}-lora-{name}")),
            None => Reference::load(&fixtures(), MODEL),
        };
        let vb = SafetensorsWeights::open(&loaded.files.weights)
            .unwrap()
            .into_var_builder(DType::F32, &Device::Cpu);
        let mut builder = Builder::new(&method, 0);
        let hidden = config.text_config.hidden_size;
        let vision = TrainVision::new(&config.vision_config, config.scale_factor, hidden, &vb, &mut builder).unwrap();
        let model = TrainText::new(&config.text_config, config.tie_word_embeddings, vb, &mut builder).unwrap();
        let trainables = builder.into_trainables();
        if let Some(name) = adapter {
            let file = fixtures()
                .join("adapters")
                .join(MODEL)
                .join(name)
                .join("adapter_model.safetensors");
            let saved = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
            assert_eq!(trainables.len(), saved.len(), "{name}: one variable per saved tensor");
            for t in &trainables {
                t.var.set(&saved[&t.name]).unwrap();
            }
        }
        let adapter_served = adapter.map(|name| {
            let model = loaded.model.as_ref();
            let dir = fixtures().join("adapters").join(MODEL).join(name);
            Adapter::load(name, &dir, &model.adapter_layout(), 64, model.dtype(), model.device()).unwrap()
        });
        for (name, case) in &reference.cases {
            let prompt = prompt_for(&loaded.processor, &reference, case);
            // The trainable vision encoder's features (those of --method full or a vision
            // LoRA), of all the prompt's tiles, against the server's.
            let tiles = stacked_tiles(&prompt);
            let features = tiles.as_ref().map(|p| vision.forward(p, &mut None).unwrap());
            if let Some(ours) = &features {
                let served = adapted_features(loaded.model.as_ref(), &prompt, adapter_served.as_ref()).unwrap();
                let served = served.embeds.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let diff = max_abs_diff(&ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &served);
                assert!(
                    diff < 1e-4,
                    "{adapter:?}/{name}: trainable vision features differ from the served by {diff}"
                );
            }
            let image_token = loaded.model.info().image_token_ids[0];
            let logits = model.logits(&prompt.token_ids, image_token, features.as_ref()).unwrap();
            let last = logits.i(prompt.token_ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
            let diff = max_abs_diff(&last, &reference.logits(name));
            assert!(diff < 1e-4, "{adapter:?}/{name}: logits differ by {diff}");
        }
    }
}

#[test]
fn a_short_lora_run_lowers_the_eval_loss_and_writes_an_adapter_the_server_loads() {
    let out = scratch("lora");
    let summary = ocellus::train::finetune(&args(&out, &["--epochs", "2", "--lr", "1e-3"])).unwrap();
    assert_eq!(summary.steps, 96, "48 conversations, 2 epochs, one per step");
    let (before, after) = (summary.eval_losses[0], *summary.eval_losses.last().unwrap());
    eprintln!(
        "eval loss {before:.3} -> {after:.3}; train loss {:.3} -> {:.3}",
        summary.first_loss, summary.last_loss
    );
    assert_eq!(summary.eval_losses.len(), 3, "before training and after each epoch");
    assert!(after < 0.8 * before, "eval loss {before} -> {after}");
    let loaded = load_fixture_model(MODEL);
    let layout = loaded.model.adapter_layout();
    let adapter = Adapter::load("trained", &out, &layout, 64, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        (adapter.rank(), adapter.modules()),
        (8, 2 * 7),
        "r 8 on seven projections of two layers"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_resumed_run_ends_where_an_unbroken_one_does() {
    let (whole, broken, resumed) = (scratch("whole"), scratch("broken"), scratch("resumed"));
    // Dropout on and four conversations per step (two forwards of two): the checkpoint must restore the data
    // order, the dropout stream and the optimizer's moments, not only the weights.
    let common = [
        "--max-steps",
        "6",
        "--gradient-accumulation-steps",
        "2",
        "--lora-dropout",
        "0.1",
    ];
    ocellus::train::finetune(&args(&whole, &common)).unwrap();
    let mut with_saves = common.to_vec();
    with_saves.extend(["--save-steps", "3"]);
    ocellus::train::finetune(&args(&broken, &with_saves)).unwrap();
    let checkpoint = broken.join("checkpoint-3");
    let mut resume = common.to_vec();
    resume.extend(["--resume", checkpoint.to_str().unwrap()]);
    let summary = ocellus::train::finetune(&args(&resumed, &resume)).unwrap();
    assert_eq!(summary.steps, 3, "steps 4 to 6");
    let load =
        |dir: &Path| candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let (a, b, mid) = (load(&whole), load(&resumed), load(&checkpoint));
    let mut moved = 0.0f32;
    for (name, tensor) in &a {
        let (x, y) = (
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(max_abs_diff(&x, &y) < 1e-6, "{name}");
        moved = moved.max(max_abs_diff(
            &x,
            &mid[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ));
    }
    assert!(moved > 1e-4, "steps 4 to 6 changed nothing");
    for dir in [whole, broken, resumed] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Every tensor of two saved folders' safetensors files equal within `tolerance`.
fn assert_same_tensors(a: &Path, b: &Path, file: &str, tolerance: f32) {
    let load = |dir: &Path| candle_core::safetensors::load(dir.join(file), &Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    for (name, tensor) in &a {
        let (x, y) = (
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(max_abs_diff(&x, &y) <= tolerance, "{name}: {}", max_abs_diff(&x, &y));
    }
}

#[test]
fn gradient_checkpointing_trains_as_the_plain_backward_does_lora_with_dropout_and_full() {
    // The vision LoRA's gradients come through the spliced image features, which under
    // checkpointing reach it from the first layer's saved input.
    for (name, method, file) in [
        (
            "lora-vision",
            [
                "--lora-dropout",
                "0.1",
                "--lora-target-modules",
                "vision.q_proj,vision.fc2,connector,q_proj",
            ],
            "adapter_model.safetensors",
        ),
        (
            "lora",
            [
                "--lora-dropout",
                "0.1",
                "--lora-target-modules",
                "q_proj,down_proj,lm_head",
            ],
            "adapter_model.safetensors",
        ),
        ("full", ["--method", "full", "--lr", "1e-4"], "model.safetensors"),
    ] {
        let (plain, checkpointed) = (scratch(&format!("{name}-plain")), scratch(&format!("{name}-ckpt")));
        let mut flags = vec![
            "--max-steps",
            "4",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
        ];
        flags.extend(method);
        let a = ocellus::train::finetune(&args(&plain, &flags)).unwrap();
        flags.push("--gradient-checkpointing");
        let b = ocellus::train::finetune(&args(&checkpointed, &flags)).unwrap();
        eprintln!("{name}: {:?} vs {:?}", a.losses, b.losses);
        assert_eq!(a.losses.len(), 4);
        for (x, y) in a
            .losses
            .iter()
            .zip(&b.losses)
            .chain(a.eval_losses.iter().zip(&b.eval_losses))
        {
            assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
        }
        assert!(
            a.losses[3] < a.losses[0] || a.eval_losses.last() < a.eval_losses.first(),
            "{name} learned nothing"
        );
        assert_same_tensors(&plain, &checkpointed, file, 1e-5);
        if name == "lora-vision" {
            assert_vision_trained(&plain);
        }
        for dir in [plain, checkpointed] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}

/// The adapter in `dir` moved its vision and connector pairs off PEFT's initial B = 0, and
/// the server, loading it, encodes images otherwise than the base model.
fn assert_vision_trained(dir: &Path) {
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    for part in [
        "vision_model.encoder.layers.0.self_attn.q_proj",
        "vision_model.encoder.layers.1.mlp.fc2",
        "connector",
    ] {
        let b = (tensors.iter())
            .find(|(name, _)| name.contains(part) && name.ends_with("lora_B.weight"))
            .unwrap_or_else(|| panic!("no {part} lora_B in {:?}", tensors.keys()))
            .1;
        let largest = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(largest > 0.0, "{part}: B is still 0");
    }
    let loaded = load_fixture_model(MODEL);
    let model = loaded.model.as_ref();
    let adapter = Adapter::load(
        "vision",
        dir,
        &model.adapter_layout(),
        64,
        model.dtype(),
        model.device(),
    )
    .unwrap();
    assert!(adapter.changes_vision());
    let reference = Reference::load(&fixtures(), MODEL);
    let prompt = prompt_for(&loaded.processor, &reference, &reference.cases["wide"]);
    let features = |adapter| {
        adapted_features(model, &prompt, adapter)
            .unwrap()
            .embeds
            .flatten_all()
            .unwrap()
    };
    let diff = max_abs_diff(
        &features(Some(&adapter)).to_vec1::<f32>().unwrap(),
        &features(None).to_vec1::<f32>().unwrap(),
    );
    assert!(
        diff > 1e-6,
        "the adapter leaves the image features as they were ({diff})"
    );
}

#[test]
fn qlora_trains_close_to_f32_lora_and_refuses_full_weights() {
    let (plain, quantized) = (scratch("q-plain"), scratch("q8"));
    let flags = [
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0",
        "--lr",
        "1e-3",
    ];
    let a = ocellus::train::finetune(&args(&plain, &flags)).unwrap();
    let mut q8 = flags.to_vec();
    q8.extend(["--quantize", "q8_0", "--gradient-checkpointing"]);
    let b = ocellus::train::finetune(&args(&quantized, &q8)).unwrap();
    eprintln!(
        "f32 {:?} / {:?}\nq8_0 {:?} / {:?}",
        a.losses, a.eval_losses, b.losses, b.eval_losses
    );
    // Int8 blocks move the losses a little, not the run: the same data, the same descent.
    for (x, y) in a
        .losses
        .iter()
        .zip(&b.losses)
        .chain(a.eval_losses.iter().zip(&b.eval_losses))
    {
        assert!((x - y).abs() < 0.02 * x.abs(), "{x} vs {y}");
        assert!(x != y, "q8_0 changed nothing: the base was not quantized");
    }
    assert!(b.eval_losses.last() < b.eval_losses.first(), "{:?}", b.eval_losses);
    // The adapter applies to the unquantized base, as a QLoRA adapter does.
    let weights = std::fs::metadata(quantized.join("adapter_model.safetensors")).unwrap();
    // Readable by a server running as another user, as the config beside it is.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(weights.permissions().mode() & 0o044, 0o044);
    let error = ocellus::train::finetune(&args(&scratch("q-full"), &["--method", "full", "--quantize", "q8_0"]))
        .unwrap_err()
        .to_string();
    assert!(error.contains("--quantize"), "{error}");
    for dir in [plain, quantized] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn broken_datasets_stop_with_an_error_naming_the_line() {
    let loaded = load_fixture_model(MODEL);
    let dir = scratch("data");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::copy(colours().join("images/train-0.png"), dir.join("images/a.png")).unwrap();
    let good = r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "images/a.png"}}, {"type": "text", "text": "Colour?"}]}, {"role": "assistant", "content": "red."}]}"#;
    let limits = DataLimits {
        max_seq_len: 512,
        max_images: 4,
        max_image_bytes: 1 << 20,
        max_image_pixels: 1 << 20,
    };
    let long = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "ok"}}]}}"#,
        "word ".repeat(1000)
    );
    for (bad, mentions) in [
        ("{\"messages\": [", "not a JSON object"),
        (&good.replace("images/a.png", "images/missing.png"), "missing.png"),
        (
            r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
            "no assistant message",
        ),
        (&long, "--max-seq-len"),
        (
            r#"{"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
            "role",
        ),
        (&good.replace("images/a.png", "data:image/png;base64,!!!"), "base64"),
    ] {
        let file = dir.join("data.jsonl");
        std::fs::write(&file, format!("{good}\n\n{bad}\n")).unwrap();
        match data::load(&Dataset::file(&file), &loaded.processor, &limits) {
            Err(DataError::Row { at, message, .. }) => {
                assert_eq!(at, Location::Line(3), "{message}");
                assert!(message.contains(mentions), "`{message}` does not mention `{mentions}`");
            }
            Err(other) => panic!("{bad}: {other}"),
            Ok(_) => panic!("{bad}: loaded"),
        }
    }
    std::fs::write(dir.join("data.jsonl"), format!("{good}\n")).unwrap();
    let examples = data::load(&Dataset::file(&dir.join("data.jsonl")), &loaded.processor, &limits).unwrap();
    let decoded_targets: Vec<u32> = (examples[0].token_ids.iter().zip(&examples[0].targets))
        .filter(|(_, t)| **t)
        .map(|(id, _)| *id)
        .collect();
    // The answer and the end of its turn are the only targets.
    let text = loaded.processor.tokenizer().decode(&decoded_targets, false).unwrap();
    assert_eq!(text.trim(), "red.<end_of_utterance>");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_full_run_writes_a_model_folder_the_server_loads_with_the_trained_weights() {
    let out = scratch("full");
    let summary =
        ocellus::train::finetune(&args(&out, &["--method", "full", "--max-steps", "8", "--lr", "1e-3"])).unwrap();
    assert!(
        summary.eval_losses[1] < summary.eval_losses[0],
        "{:?}",
        summary.eval_losses
    );
    let trained = ocellus::runtime::load_folder(&out, ocellus::config::WeightDType::F32, &Device::Cpu).unwrap();
    let base = load_fixture_model(MODEL);
    let reference = Reference::load(&fixtures(), MODEL);
    let case = &reference.cases["wide"];
    let prompt = prompt_for(&trained.processor, &reference, case);
    assert_eq!(prompt.token_ids, case.input_ids, "the processor files came along");
    let diff = max_abs_diff(
        &first_step_logits(trained.model.as_ref(), &prompt),
        &first_step_logits(base.model.as_ref(), &prompt),
    );
    assert!(diff > 1e-3, "the saved weights are the base model's");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_batch_of_sequences_has_the_summed_loss_of_each_alone() {
    let loaded = load_fixture_model(MODEL);
    let config = SmolVlmConfig::load(&loaded.files.config).unwrap();
    let vb = SafetensorsWeights::open(&loaded.files.weights)
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let model = TrainText::new(
        &config.text_config,
        config.tie_word_embeddings,
        vb,
        &mut Builder::new(&Method::Full, 0),
    )
    .unwrap();
    let limits = DataLimits {
        max_seq_len: 2048,
        max_images: 4,
        max_image_bytes: 1 << 20,
        max_image_pixels: 1 << 20,
    };
    let examples = data::load(
        &Dataset::file(&colours().join("eval.jsonl")),
        &loaded.processor,
        &limits,
    )
    .unwrap();
    let image_token = loaded.model.info().image_token_ids[0];
    fn seq<'e>(
        e: &'e data::Example,
        model: &dyn ocellus::model::VisionLanguageModel,
    ) -> ocellus::train::text::Sequence<'e> {
        let features = e.pixel_values.as_ref().map(|p| {
            let tiles = ocellus::model::Pixels {
                values: p.clone(),
                grid: None,
            };
            model.encode_images(&[&tiles], None).unwrap().remove(0).embeds
        });
        ocellus::train::text::Sequence {
            ids: &e.token_ids,
            targets: &e.targets,
            features,
        }
    }
    let (mut alone, mut count) = (0f32, 0);
    for e in &examples[..3] {
        let (loss, n) = model.loss(&[seq(e, loaded.model.as_ref())], image_token, None).unwrap();
        alone += loss.to_scalar::<f32>().unwrap();
        count += n;
    }
    let batch: Vec<_> = examples[..3].iter().map(|e| seq(e, loaded.model.as_ref())).collect();
    let (together, n) = model.loss(&batch, image_token, None).unwrap();
    let together = together.to_scalar::<f32>().unwrap();
    assert_eq!(n, count);
    assert!((together - alone).abs() < 1e-3 * alone.abs(), "{together} vs {alone}");
}

/// Every tile of a prompt's images, stacked as the training encoder takes them.
fn stacked_tiles(prompt: &ocellus::engine::Prompt) -> Option<candle_core::Tensor> {
    let tiles: Vec<_> = prompt.images.iter().map(|i| i.pixels.values.clone()).collect();
    (!tiles.is_empty()).then(|| candle_core::Tensor::cat(&tiles, 0).unwrap())
}

#[test]
fn a_family_without_a_training_form_is_refused_by_name() {
    let out = scratch("qwen");
    let model = fixtures().join("models").join("tiny-qwen3vl");
    let mut args = args(&out, &[]);
    args.model = model.to_str().unwrap().to_string();
    let err = ocellus::train::finetune(&args).unwrap_err().to_string();
    assert!(
        err.contains("Qwen3VLForConditionalGeneration") && err.contains("not supported"),
        "{err}"
    );
}
