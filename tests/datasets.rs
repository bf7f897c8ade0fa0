//! Hub datasets for `ocellus finetune` and `evaluate`: the colours set and the DPO pairs
//! written by `datasets` (scripts/fixtures_datasets.py: TRL's columns, images as encoded
//! bytes, snappy and zstd) read to the same examples as the JSONL they come from, train to
//! the same losses, resolve as hub ids through the cache, and a broken row stops the run
//! naming its file, row group and row.

mod common;

use std::path::{Path, PathBuf};

use clap::Parser;
use common::*;
use ocellus::config::{Cli, Command, FinetuneArgs};
use ocellus::train::data::{self, DataLimits, Example};
use ocellus::train::dataset::{Columns, Dataset, Location};
use ocellus::train::evaluate::read_cases;
use ocellus::train::preference;

const MODEL: &str = "tiny-idefics3";

fn finetune_fixtures() -> PathBuf {
    fixtures().join("finetune")
}

fn hub(name: &str) -> PathBuf {
    finetune_fixtures().join("hub").join(name)
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ocellus-datasets-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn limits() -> DataLimits {
    DataLimits {
        max_seq_len: 2048,
        max_images: 4,
        max_image_bytes: 1 << 20,
        max_image_pixels: 1 << 24,
    }
}

fn open(spec: &Path, split: &str) -> Dataset {
    Dataset::open(spec, split, &Columns::default()).unwrap()
}

fn assert_same_examples(parquet: &[Example], jsonl: &[Example]) {
    assert_eq!(parquet.len(), jsonl.len());
    for (i, (a, b)) in parquet.iter().zip(jsonl).enumerate() {
        assert_eq!(a.token_ids, b.token_ids, "example {i}");
        assert_eq!(a.targets, b.targets, "example {i}");
        let pixels = |e: &Example| {
            e.pixel_values
                .as_ref()
                .map(|p| p.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        };
        assert!(pixels(a).is_some(), "example {i} has its image");
        assert_eq!(pixels(a), pixels(b), "example {i}");
    }
}

#[test]
fn trl_conversations_in_parquet_read_to_the_jsonl_examples_both_splits() {
    let loaded = load_fixture_model(MODEL);
    let colours = finetune_fixtures().join("colours");
    for (split, jsonl) in [("train", "train.jsonl"), ("test", "eval.jsonl")] {
        let dataset = open(&hub("colours-sft"), split);
        assert!(dataset.name().ends_with(format!("data/{split}-00000-of-00001.parquet")));
        let parquet = data::load(&dataset, &loaded.processor, &limits()).unwrap();
        let expected = data::load(&Dataset::file(&colours.join(jsonl)), &loaded.processor, &limits()).unwrap();
        assert_same_examples(&parquet, &expected);
        assert_eq!(parquet[1].at, Location::Row { group: 0, row: 1 });
    }
}

#[test]
fn trl_preference_columns_in_parquet_read_to_the_jsonl_pairs() {
    let loaded = load_fixture_model(MODEL);
    let parquet = preference::load(&open(&hub("colours-dpo"), "train"), &loaded.processor, &limits()).unwrap();
    let jsonl = Dataset::file(&finetune_fixtures().join("dpo").join("pairs.jsonl"));
    let expected = preference::load(&jsonl, &loaded.processor, &limits()).unwrap();
    let sides = |pairs: &[preference::Pair], chosen: bool| -> Vec<Example> {
        (pairs.iter())
            .map(|p| if chosen { &p.chosen } else { &p.rejected })
            .map(|e| Example {
                at: e.at,
                token_ids: e.token_ids.clone(),
                targets: e.targets.clone(),
                pixel_values: e.pixel_values.clone(),
                features: None,
            })
            .collect()
    };
    assert_same_examples(&sides(&parquet, true), &sides(&expected, true));
    assert_same_examples(&sides(&parquet, false), &sides(&expected, false));
    // As evaluation data, a pair's chosen answer is the one expected.
    let cases = read_cases(&open(&hub("colours-dpo"), "train")).unwrap();
    assert_eq!((cases.len(), cases[0].answer.as_str()), (4, "yellow."));
    assert!(
        cases[0].prompt[0]["content"][0]["image_url"]["url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
}

fn finetune_args(out: &Path, data: &Path, eval: &Path, extra: &[&str]) -> FinetuneArgs {
    let model = Reference::model_dir(&fixtures(), MODEL);
    let mut argv = vec!["ocellus", "finetune", "--model", model.to_str().unwrap()];
    argv.extend(["--data", data.to_str().unwrap(), "--eval", eval.to_str().unwrap()]);
    argv.extend(["--out", out.to_str().unwrap(), "--max-steps", "3", "--batch-size", "4"]);
    argv.extend(["--lora-dropout", "0", "--lr", "1e-3"]);
    argv.extend(extra);
    match Cli::parse_from(argv).command {
        Command::Finetune(args) => args,
        _ => unreachable!(),
    }
}

/// Three steps from `parquet` (train, eval) and from `jsonl`: the same losses, exactly.
fn same_losses(name: &str, parquet: [PathBuf; 2], jsonl: [PathBuf; 2], extra: &[&str]) {
    let out = scratch(name);
    let [data, eval] = parquet;
    let from_parquet = ocellus::train::finetune(&finetune_args(&out.join("p"), &data, &eval, extra)).unwrap();
    let [data, eval] = jsonl;
    let from_jsonl = ocellus::train::finetune(&finetune_args(&out.join("j"), &data, &eval, extra)).unwrap();
    eprintln!(
        "{name}: losses {:?}, eval {:?}",
        from_parquet.losses, from_parquet.eval_losses
    );
    assert_eq!(from_parquet.losses.len(), 3);
    assert_eq!(from_parquet.losses, from_jsonl.losses, "{name}");
    assert_eq!(from_parquet.eval_losses, from_jsonl.eval_losses, "{name}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn sft_on_parquet_gives_the_losses_of_the_same_jsonl() {
    let colours = finetune_fixtures().join("colours");
    let jsonl = [colours.join("train.jsonl"), colours.join("eval.jsonl")];
    same_losses("sft", [hub("colours-sft"), hub("colours-sft")], jsonl, &[]);
}

#[test]
fn dpo_on_parquet_gives_the_losses_of_the_same_jsonl() {
    let pairs = finetune_fixtures().join("dpo").join("pairs.jsonl");
    let extra = ["--method", "dpo", "--eval-split", "train", "--epochs", "3"];
    same_losses(
        "dpo",
        [hub("colours-dpo"), hub("colours-dpo")],
        [pairs.clone(), pairs],
        &extra,
    );
}

#[test]
fn a_hub_id_resolves_to_its_cached_snapshot() {
    let cache = scratch("cache");
    let repo = cache.join("datasets--ocellus--colours");
    let snapshot = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    copy_dir(&hub("colours-sft"), &snapshot);
    let dataset = Dataset::open_in(Path::new("ocellus/colours"), "test", &Columns::default(), &cache).unwrap();
    assert!(dataset.name().starts_with(&snapshot), "{}", dataset.name().display());
    let loaded = load_fixture_model(MODEL);
    assert_eq!(data::load(&dataset, &loaded.processor, &limits()).unwrap().len(), 16);
    std::fs::remove_dir_all(cache).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        match entry.file_type().unwrap().is_dir() {
            true => copy_dir(&entry.path(), &to.join(entry.file_name())),
            false => drop(std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap()),
        }
    }
}

#[test]
fn a_broken_row_stops_the_run_naming_file_row_group_and_row() {
    let out = scratch("broken");
    let args = finetune_args(&out, &hub("broken"), &hub("colours-sft"), &[]);
    let error = format!("{:#}", ocellus::train::finetune(&args).unwrap_err());
    assert!(
        error.contains("data/train-00000-of-00001.parquet: row group 1, row 1: `messages` has 2 image placeholders but the row has 1 images"),
        "{error}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn columns_of_other_names_are_mapped_and_a_missing_one_is_named() {
    let loaded = load_fixture_model(MODEL);
    let renamed = Columns::parse(&["messages=conversation".into()]).unwrap();
    let dataset = Dataset::open(&hub("colours-sft"), "train", &renamed).unwrap();
    let error = data::load(&dataset, &loaded.processor, &limits())
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("row group 0, row 0: no column `conversation` (--columns messages=conversation)"),
        "{error}"
    );
    // TRL's columns under other names, in JSONL, the image a path.
    let out = scratch("columns");
    let colours = finetune_fixtures().join("colours");
    let image = colours.join("images").join("train-0.png");
    let row = serde_json::json!({
        "picture": image.to_str().unwrap(),
        "conversation": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "yellow."}]},
        ],
        "source": "ignored",
    });
    std::fs::write(out.join("renamed.jsonl"), format!("{row}\n")).unwrap();
    let columns = Columns::parse(&["messages=conversation".into(), "images=picture".into()]).unwrap();
    let dataset = Dataset::open(&out.join("renamed.jsonl"), "train", &columns).unwrap();
    let renamed = data::load(&dataset, &loaded.processor, &limits()).unwrap();
    let expected = data::load(
        &Dataset::file(&colours.join("train.jsonl")),
        &loaded.processor,
        &limits(),
    )
    .unwrap();
    assert_same_examples(&renamed, &expected[..1]);
    std::fs::remove_dir_all(out).unwrap();
}
