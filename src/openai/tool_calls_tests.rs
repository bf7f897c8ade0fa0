use super::*;

fn reader(parallel: bool) -> CallReader {
    CallReader {
        names: vec!["get_weather".into(), "get_time".into()],
        parallel,
    }
}

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

const TWO: &str = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET}\"}}\n</tool_call>";

#[test]
fn answers_split_into_content_and_calls() {
    let parsed = reader(true).parse(TWO);
    assert_eq!(parsed.content.as_deref(), Some("Let me look."));
    assert_eq!(
        parsed.calls,
        [
            call("get_weather", r#"{"city": "Paris", "days": [1, 2]}"#),
            call("get_time", r#"{"zone": "CET}"}"#)
        ]
    );
    // One call allowed: the first.
    assert_eq!(reader(false).parse(TWO).calls.len(), 1);
    // No call: all content, blanks kept.
    assert_eq!(reader(true).parse(" plain\n").content.as_deref(), Some(" plain\n"));
    // An unterminated last call still parses (the answer ended with it); a call alone has no content.
    let open = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}";
    assert_eq!(
        reader(true).parse(open),
        Parsed {
            content: None,
            calls: vec![call("get_time", "{}")]
        }
    );
}

#[test]
fn a_call_that_does_not_parse_or_names_no_tool_leaves_all_content() {
    for text in [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
        "<tool_call>\n{\"name\": \"launch\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": \"now\"}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_time\"}\n</tool_call>",
    ] {
        let parsed = reader(true).parse(text);
        assert_eq!(
            (parsed.content.as_deref(), parsed.calls.len()),
            (Some(text), 0),
            "{text}"
        );
    }
}

/// The deltas of `text` fed in pieces of `size` bytes (on character boundaries).
fn stream(text: &str, size: usize, parallel: bool) -> Vec<Delta> {
    let mut stream = CallStream::new(reader(parallel));
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = size.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        out.extend(stream.push(&rest[..cut]));
        rest = &rest[cut..];
    }
    out.extend(stream.finish());
    out
}

/// The stream's deltas put back together, as a client does.
fn assemble(deltas: &[Delta]) -> Parsed {
    let mut content = String::new();
    let mut calls: Vec<ParsedCall> = Vec::new();
    for delta in deltas {
        match delta {
            Delta::Content(text) => content.push_str(text),
            Delta::CallStart { index, name } => {
                assert_eq!(*index, calls.len());
                calls.push(call(name, ""));
            }
            Delta::Arguments { index, text } => calls[*index].arguments.push_str(text),
        }
    }
    Parsed {
        content: (!content.is_empty()).then_some(content),
        calls,
    }
}

#[test]
fn streams_in_any_pieces_add_up_to_the_parsed_answer() {
    let texts = [
        TWO,
        "no call, < and <tool but not the tag\n",
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"a\": {\"b\": \"}}\"}}}\n</tool_call>",
        "<tool_call>{\"arguments\": {\"x\": 1}, \"name\": \"get_time\"}</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\"}}",
        "é\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call> trailing",
    ];
    for text in texts {
        for parallel in [true, false] {
            let parsed = reader(parallel).parse(text);
            for size in [1, 2, 3, 7, 1000] {
                assert_eq!(
                    assemble(&stream(text, size, parallel)),
                    parsed,
                    "{text:?} in pieces of {size}"
                );
            }
        }
    }
}

#[test]
fn arguments_stream_in_pieces_as_they_come() {
    let deltas = stream(TWO, 4, true);
    let pieces = (deltas.iter())
        .filter(|d| matches!(d, Delta::Arguments { index: 0, .. }))
        .count();
    assert!(pieces > 3, "{deltas:?}");
}

#[test]
fn required_and_named_choices_make_grammars() {
    let tools = |choice, parallel| Tools {
        tools: vec![
            Tool {
                name: "get_weather".into(),
                description: None,
                parameters: Some(serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}})),
            },
            Tool {
                name: "get_time".into(),
                description: None,
                parameters: None,
            },
        ],
        choice,
        parallel,
    };
    assert_eq!(grammar(&tools(ToolChoice::Auto, true)), None);
    let required = grammar(&tools(ToolChoice::Required, true)).unwrap();
    assert!(
        required.starts_with("start: call (\"\\n\" call)*\ncall: call_0 | call_1\n"),
        "{required}"
    );
    assert!(required.contains(r#"call_0: "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": " %json {"#));
    let named = grammar(&tools(ToolChoice::Function("get_time".into()), true)).unwrap();
    assert!(
        named.starts_with("start: call\ncall: call_0\ncall_0: ") && named.contains("get_time"),
        "{named}"
    );
    assert!(!named.contains("get_weather"));
}
