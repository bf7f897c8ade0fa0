//! The built-in embedding model, `ocellus-demo-clip` (`models/ocellus-demo-clip`, carried in
//! the binary and named as users name it): a CLIP trained by `ocellus
//! finetune --method contrastive` on `ocellus demo-data --captions`, classifies the README's
//! 200 held-out images zero-shot and finds them by their captions (regenerated here from
//! their seed).

use ocellus::config::EvaluateArgs;
use ocellus::train::synthetic::{KINDS, write_caption_split};

#[test]
fn the_demo_clip_classifies_and_retrieves_held_out_images() {
    let dir = tempfile::tempdir().unwrap();
    // `ocellus demo-data --seed 0` draws its test split from seed 1000000.
    write_caption_split(dir.path(), "test", 200, 1_000_000).unwrap();
    let args = EvaluateArgs {
        model: ocellus::model::demo::DEMO_CLIP.into(),
        lora: None,
        data: dir.path().join("test-captions.jsonl"),
        max_tokens: 8,
        pairs_out: None,
        split: "test".into(),
        columns: Vec::new(),
        answer_regex: None,
    };
    let report = ocellus::runtime::evaluate(&args).unwrap();
    eprintln!("{report}");
    assert_eq!(report["pairs"], 200);
    for kind in KINDS {
        let kind_report = &report["per_kind"][kind];
        assert_eq!(kind_report["count"], 40, "{kind}");
        assert!(
            kind_report["zero_shot_accuracy"].as_f64().unwrap() >= 0.9,
            "{kind}: {report}"
        );
    }
    assert!(report["recall_at_1"].as_f64().unwrap() >= 0.9, "{report}");
}
