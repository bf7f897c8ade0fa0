//! The built-in model is the demo: trained by `ocellus finetune` on `ocellus demo-data`, it
//! answers held-out questions of every kind (the first 50 of the README's held-out set,
//! regenerated here from its seed).

use ocellus::config::{DEFAULT_MODEL, EvaluateArgs};
use ocellus::train::synthetic::{KINDS, write_split};

#[test]
fn the_built_in_model_answers_held_out_demo_questions() {
    let dir = std::env::temp_dir().join(format!("ocellus-demo-{}", std::process::id()));
    // `ocellus demo-data --seed 0` draws its test split from seed 1000000.
    write_split(&dir, "test", 50, 1_000_000).unwrap();
    let args = EvaluateArgs {
        model: DEFAULT_MODEL.into(),
        lora: None,
        data: dir.join("test.jsonl"),
        max_tokens: 8,
        pairs_out: Some(dir.join("mistakes.jsonl")),
        split: "test".into(),
        columns: Vec::new(),
        answer_regex: None,
    };
    let report = ocellus::runtime::evaluate(&args).unwrap();
    eprintln!("{report}");
    let accuracy = &report["accuracy"];
    assert_eq!(accuracy["all"]["total"], 50);
    assert!(accuracy["all"]["accuracy"].as_f64().unwrap() >= 0.9, "{report}");
    for kind in KINDS {
        assert_eq!(accuracy[kind]["total"], 10, "{kind}");
        assert!(accuracy[kind]["accuracy"].as_f64().unwrap() >= 0.7, "{kind}: {report}");
    }
    // Each wrong answer became a preference pair, the expected answer chosen.
    let correct = accuracy["all"]["correct"].as_u64().unwrap() as usize;
    let pairs = std::fs::read_to_string(dir.join("mistakes.jsonl")).unwrap();
    assert_eq!(pairs.lines().count(), 50 - correct, "{pairs}");
    std::fs::remove_dir_all(dir).unwrap();
}
