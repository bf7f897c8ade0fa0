//! Constrained decoding on the random-weight fixtures, which left alone emit garbage: every
//! sampled output under a JSON schema (nested objects, arrays, enums, bounded numbers,
//! required and optional fields) parses and satisfies the schema, alone and batched with
//! unconstrained sequences, which still produce exactly their unconstrained tokens.

mod common;

use std::sync::Arc;

use common::*;
use ocellus::engine::constraint::Grammar;
use ocellus::engine::{GenerationRequest, Prompt, SamplingParams, generate};
use ocellus::openai::structured::{Constrained, OutputConstraint};
use ocellus::processor::Processor;
use serde_json::{Value, json};

const SAMPLES: u64 = 50;

/// A constraint and a check of what it lets through.
type Check = (OutputConstraint, Box<dyn Fn(&str) -> bool>);

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "kind": {"enum": ["cat", "dog", "bird"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 20},
            "score": {"type": "number", "minimum": -1.5, "maximum": 1.5},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "active": {"type": "boolean"}
                },
                "required": ["id"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "owner"],
        "additionalProperties": false
    })
}

fn compile(processor: &Processor, constraint: OutputConstraint) -> Arc<Grammar> {
    let constrained = Constrained {
        constraint,
        param: "response_format".into(),
    };
    processor.grammar(Some(&constrained)).unwrap().unwrap()
}

/// Sampled at temperature 1 with `seed`, up to 400 tokens, under `grammar`.
fn sampled(prompt: &Prompt, grammar: &Arc<Grammar>, seed: u64) -> GenerationRequest {
    let mut request = GenerationRequest::greedy(prompt.clone(), 400);
    request.params.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..Default::default()
    };
    request.params.grammar = Some(grammar.clone());
    request
}

fn text_prompt(processor: &Processor) -> Prompt {
    let (messages, _) = openai_messages(
        &[json!({"role": "user", "content": "Describe the animal as JSON."})],
        &fixtures(),
    );
    let text = processor.render(&messages).unwrap();
    processor.process_rendered(&text, &[], Vec::new()).unwrap()
}

#[test]
fn sampled_outputs_satisfy_the_schema_alone_and_batched_with_free_sequences() {
    let reference = Reference::load(&fixtures(), "tiny-idefics3");
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 512);
    let grammar = compile(&processor, OutputConstraint::JsonSchema(schema().to_string()));
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let prompt = text_prompt(&processor);
    let mut alone = Vec::new();
    for seed in 0..SAMPLES {
        let generation = generate(&mut engine, vec![sampled(&prompt, &grammar, seed)], |_| {})
            .unwrap()
            .0
            .remove(0);
        let value: Value = serde_json::from_str(&generation.text).unwrap_or_else(|e| {
            panic!(
                "seed {seed}: {e}: {:?} ({:?})",
                generation.text, generation.finish_reason
            )
        });
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "seed {seed}: {value} breaks the schema: {errors:?}");
        alone.push(generation.tokens);
    }
    let distinct: std::collections::HashSet<&Vec<u32>> = alone.iter().collect();
    assert!(
        distinct.len() > SAMPLES as usize / 2,
        "sampling at temperature 1 varies"
    );

    // The same seeds in one batch with the greedy reference cases, unconstrained.
    let cases = ["wide", "text_only"];
    let mut requests: Vec<GenerationRequest> = (cases.iter())
        .map(|name| {
            let case = &reference.cases[*name];
            greedy(prompt_for(&processor, &reference, case), case.greedy_tokens.len())
        })
        .collect();
    requests.extend((0..SAMPLES).map(|seed| sampled(&prompt, &grammar, seed)));
    let (generations, _) = generate(&mut engine, requests, |_| {}).unwrap();
    for (name, generation) in cases.iter().zip(&generations) {
        assert_eq!(generation.tokens, reference.cases[*name].greedy_tokens, "{name}");
    }
    for (seed, (generation, tokens)) in generations[cases.len()..].iter().zip(&alone).enumerate() {
        assert_eq!(&generation.tokens, tokens, "seed {seed}: batched differs from alone");
    }
}

#[test]
fn regexes_choices_and_lark_grammars_hold_and_bad_ones_are_refused() {
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 256);
    let prompt = text_prompt(&processor);
    let regex = regex::Regex::new(r"^[0-9]{3}-[a-z]{2,4}$").unwrap();
    let checks: Vec<Check> = vec![
        (
            OutputConstraint::Regex("[0-9]{3}-[a-z]{2,4}".into()),
            Box::new(move |text: &str| regex.is_match(text)),
        ),
        (
            OutputConstraint::Choice(vec!["yes".into(), "no".into(), "a (b)|c".into()]),
            Box::new(|text: &str| ["yes", "no", "a (b)|c"].contains(&text)),
        ),
        (
            OutputConstraint::Grammar(
                r#"start: "[" item ("," item)* "]"
item: /[ab]{1,3}/"#
                    .into(),
            ),
            Box::new(|text: &str| {
                let inner = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
                inner.is_some_and(|i| {
                    i.split(',')
                        .all(|s| (1..=3).contains(&s.len()) && s.chars().all(|c| "ab".contains(c)))
                })
            }),
        ),
    ];
    for (constraint, holds) in checks {
        let grammar = compile(&processor, constraint.clone());
        for seed in 0..10 {
            let generation = generate(&mut engine, vec![sampled(&prompt, &grammar, seed)], |_| {})
                .unwrap()
                .0
                .remove(0);
            assert!(
                holds(&generation.text),
                "{constraint:?}, seed {seed}: {:?}",
                generation.text
            );
        }
    }
    for bad in [
        OutputConstraint::JsonSchema(r##"{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}"##.into()),
        OutputConstraint::Regex("(unclosed".into()),
        OutputConstraint::Grammar("start: undefined_rule".into()),
    ] {
        let constrained = Constrained {
            constraint: bad.clone(),
            param: "structured_outputs.grammar".into(),
        };
        let error = processor.grammar(Some(&constrained)).unwrap_err();
        assert_eq!(error.status(), 400, "{bad:?}");
        assert_eq!(error.param().as_deref(), Some("structured_outputs.grammar"));
    }
}

#[test]
fn the_other_families_tokenizers_follow_a_schema_too() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    for model in ["tiny-qwen3vl", "tiny-smolvlm2"] {
        let (processor, mut engine) = engine(load_fixture_model(model), 4096, 256);
        let grammar = compile(&processor, OutputConstraint::JsonSchema(schema().to_string()));
        let prompt = text_prompt(&processor);
        for seed in 0..10 {
            let generation = generate(&mut engine, vec![sampled(&prompt, &grammar, seed)], |_| {})
                .unwrap()
                .0
                .remove(0);
            let value: Value = serde_json::from_str(&generation.text)
                .unwrap_or_else(|e| panic!("{model}, seed {seed}: {e}: {:?}", generation.text));
            assert!(validator.is_valid(&value), "{model}, seed {seed}: {value}");
        }
    }
}

#[test]
fn a_recursive_schema_compiles_and_its_outputs_validate() {
    let tree = json!({
        "$defs": {"node": {
            "type": "object",
            "properties": {
                "label": {"enum": ["a", "b"]},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}
            },
            "required": ["label"],
            "additionalProperties": false
        }},
        "$ref": "#/$defs/node"
    });
    let validator = jsonschema::validator_for(&tree).unwrap();
    let (processor, mut engine) = engine(load_fixture_model("tiny-idefics3"), 4096, 256);
    let grammar = compile(&processor, OutputConstraint::JsonSchema(tree.to_string()));
    let prompt = text_prompt(&processor);
    let mut complete = 0;
    for seed in 0..10 {
        let generation = generate(&mut engine, vec![sampled(&prompt, &grammar, seed)], |_| {})
            .unwrap()
            .0
            .remove(0);
        // A tree may outgrow the token budget: only a finished one must parse.
        if generation.finish_reason == ocellus::engine::FinishReason::Stop {
            let value: Value = serde_json::from_str(&generation.text).unwrap();
            assert!(validator.is_valid(&value), "seed {seed}: {value}");
            complete += 1;
        }
    }
    assert!(complete >= 5, "{complete} of 10 trees finished within 400 tokens");
}
