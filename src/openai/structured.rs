//! What a request constrains its output to: OpenAI's `response_format` (`json_object`,
//! `json_schema`) and vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`,
//! `json_object`) with its older `guided_*` fields. At most one of them per request; the
//! grammar itself is compiled (and refused, if it must be) where the tokenizer is known.

use serde::Deserialize;
use serde_json::Value;

use super::error::ValidationError;
use super::types::SamplingFields;

/// OpenAI's `response_format`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// No schema: any JSON value.
    pub schema: Option<Value>,
    /// The output always follows the schema here, strict or not.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: exactly one of its constraints.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON schema, as an object or as its text.
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar (llguidance's dialect).
    pub grammar: Option<String>,
    pub json_object: Option<bool>,
}

/// A request's output constraint, validated: what the engine's grammar compiler takes.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// A JSON value under this schema (its text).
    JsonSchema(String),
    /// A string matching this regular expression in full.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar.
    Grammar(String),
}

/// The constraint and the field it came from (for the error a bad grammar gets).
#[derive(Debug, Clone, PartialEq)]
pub struct Constrained {
    pub constraint: OutputConstraint,
    pub param: String,
}

/// The request's constraint from `response_format`, `structured_outputs` and vLLM's older
/// `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`: at most one may be given.
pub fn of_fields(fields: &SamplingFields, max_depth: usize) -> Result<Option<Constrained>, ValidationError> {
    let guided = StructuredOutputs {
        json: fields.guided_json.clone(),
        regex: fields.guided_regex.clone(),
        choice: fields.guided_choice.clone(),
        grammar: fields.guided_grammar.clone(),
        json_object: None,
    };
    let mut found = Vec::new();
    match &fields.response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => found.push(Constrained {
            constraint: any_object(),
            param: "response_format".into(),
        }),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            if !super::tools::valid_name(&json_schema.name) {
                return Err(ValidationError::InvalidInput {
                    param: "response_format.json_schema.name".into(),
                    message: "must be 1 to 64 letters, digits, underscores or dashes".into(),
                });
            }
            let param = "response_format.json_schema.schema";
            let schema = json_schema.schema.clone().unwrap_or(Value::Object(Default::default()));
            found.push(Constrained {
                constraint: schema_text(&schema, param, max_depth)?,
                param: param.into(),
            });
        }
    }
    if let Some(structured) = &fields.structured_outputs {
        structured_fields(structured, "structured_outputs.", max_depth, &mut found)?;
    }
    structured_fields(&guided, "guided_", max_depth, &mut found)?;
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ValidationError::InvalidInput {
            param: found[1].param.clone(),
            message: format!(
                "cannot be given with `{}`: one constraint per request (`response_format` or one field of `structured_outputs`)",
                found[0].param
            ),
        }),
    }
}

/// The constraints `s` gives, their fields named `{prefix}{field}`.
fn structured_fields(
    s: &StructuredOutputs,
    prefix: &str,
    max_depth: usize,
    found: &mut Vec<Constrained>,
) -> Result<(), ValidationError> {
    let param = |field: &str| format!("{prefix}{field}");
    let mut add = |constraint, field: &str| {
        found.push(Constrained {
            constraint,
            param: param(field),
        })
    };
    if let Some(json) = &s.json {
        let schema = match json {
            Value::String(text) => serde_json::from_str(text).map_err(|e| ValidationError::InvalidInput {
                param: param("json"),
                message: format!("is not a JSON schema: {e}"),
            })?,
            other => other.clone(),
        };
        add(schema_text(&schema, &param("json"), max_depth)?, "json");
    }
    if let Some(regex) = &s.regex {
        add(OutputConstraint::Regex(regex.clone()), "regex");
    }
    if let Some(choice) = &s.choice {
        if choice.is_empty() {
            return Err(ValidationError::InvalidInput {
                param: param("choice"),
                message: "must list at least one string".into(),
            });
        }
        add(OutputConstraint::Choice(choice.clone()), "choice");
    }
    if let Some(grammar) = &s.grammar {
        add(OutputConstraint::Grammar(grammar.clone()), "grammar");
    }
    if s.json_object == Some(true) {
        add(any_object(), "json_object");
    }
    Ok(())
}

fn any_object() -> OutputConstraint {
    OutputConstraint::JsonSchema(r#"{"type":"object"}"#.into())
}

/// A schema checked to be an object (or a boolean, JSON schema's "anything"/"nothing")
/// nested at most `max_depth` deep, as text.
fn schema_text(schema: &Value, param: &str, max_depth: usize) -> Result<OutputConstraint, ValidationError> {
    if !matches!(schema, Value::Object(_) | Value::Bool(_)) {
        return Err(ValidationError::InvalidInput {
            param: param.into(),
            message: "must be a JSON schema: an object".into(),
        });
    }
    check_depth(schema, param, max_depth)?;
    Ok(OutputConstraint::JsonSchema(schema.to_string()))
}

/// A schema (`param`) nesting objects and arrays at most `max_depth` deep.
pub(super) fn check_depth(schema: &Value, param: &str, max_depth: usize) -> Result<(), ValidationError> {
    let depth = depth(schema);
    if depth > max_depth {
        return Err(ValidationError::InvalidInput {
            param: param.into(),
            message: format!("nests {depth} levels deep, more than the limit of {max_depth}"),
        });
    }
    Ok(())
}

/// How deeply objects and arrays nest in `value` (a scalar: 0).
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn of(value: Value, depth: usize) -> Result<Option<Constrained>, ValidationError> {
        of_fields(&serde_json::from_value(value).unwrap(), depth)
    }

    fn constraint_of(value: Value) -> Option<OutputConstraint> {
        of(value, 8).unwrap().map(|c| c.constraint)
    }

    #[test]
    fn each_form_becomes_its_constraint_and_two_at_once_are_refused() {
        let schema = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}});
        assert_eq!(
            constraint_of(json!({"response_format": schema})),
            Some(OutputConstraint::JsonSchema(r#"{"type":"integer"}"#.into()))
        );
        assert_eq!(
            constraint_of(json!({"response_format": {"type": "json_object"}})),
            Some(any_object())
        );
        assert_eq!(constraint_of(json!({"response_format": {"type": "text"}})), None);
        let choice = json!({"choice": ["yes", "no"]});
        assert_eq!(
            constraint_of(json!({"structured_outputs": choice})),
            Some(OutputConstraint::Choice(vec!["yes".into(), "no".into()]))
        );
        assert_eq!(
            constraint_of(json!({"guided_json": "{\"type\": \"string\"}"})),
            Some(OutputConstraint::JsonSchema(r#"{"type":"string"}"#.into()))
        );
        assert_eq!(
            constraint_of(json!({"guided_regex": "a+"})),
            Some(OutputConstraint::Regex("a+".into()))
        );
        let both = of(json!({"response_format": schema, "structured_outputs": choice}), 8).unwrap_err();
        assert!(
            matches!(both, ValidationError::InvalidInput { ref param, .. } if param == "structured_outputs.choice")
        );
        let two = of(
            json!({"structured_outputs": {"regex": "a", "grammar": "start: \"a\""}}),
            8,
        )
        .unwrap_err();
        assert!(
            matches!(two, ValidationError::InvalidInput { ref param, .. } if param == "structured_outputs.grammar")
        );
    }

    #[test]
    fn schemas_too_deep_or_not_objects_and_unknown_forms_are_refused() {
        let mut schema = json!({"type": "integer"});
        for _ in 0..10 {
            schema = json!({"type": "object", "properties": {"a": schema}});
        }
        let deep = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
        assert!(of(deep.clone(), 64).is_ok());
        assert!(matches!(of(deep, 8), Err(ValidationError::InvalidInput { .. })));
        let bad_name =
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}});
        let refused = of(bad_name, 8).unwrap_err();
        assert_eq!(refused.param().as_deref(), Some("response_format.json_schema.name"));
        let not_object =
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}});
        assert!(of(not_object, 64).is_err());
        assert!(serde_json::from_value::<SamplingFields>(json!({"response_format": {"type": "xml"}})).is_err());
        assert!(
            serde_json::from_value::<SamplingFields>(json!({"structured_outputs": {"whitespace_pattern": " "}}))
                .is_err()
        );
        assert!(of(json!({"structured_outputs": {"choice": []}}), 8).is_err());
    }
}
