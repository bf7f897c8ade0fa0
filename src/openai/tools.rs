//! OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, read and checked: function
//! tools with JSON-schema parameters, and which of them the model may or must call.

use serde::Deserialize;
use serde_json::Value;

use super::error::ValidationError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionIn {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments (an object); none: no arguments.
    pub parameters: Option<Value>,
    pub strict: Option<bool>,
}

/// `"none"`, `"auto"`, `"required"`, or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Named(NamedToolIn),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedToolIn {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunctionIn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunctionIn {
    pub name: String,
}

/// A function the model may call, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// Its arguments' JSON schema, as sent (an object).
    pub parameters: Option<Value>,
}

impl Tool {
    /// The arguments' schema: no parameters given, no arguments (OpenAI: "an empty
    /// parameter list").
    pub fn schema(&self) -> Value {
        (self.parameters.clone())
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}))
    }

    /// The tool in OpenAI's shape, as chat templates take it: the fields sent, in OpenAI's
    /// order.
    pub fn as_json(&self) -> Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(description) = &self.description {
            function.insert("description".into(), description.clone().into());
        }
        if let Some(parameters) = &self.parameters {
            function.insert("parameters".into(), parameters.clone());
        }
        serde_json::json!({"type": "function", "function": function})
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Answer with a message, calling nothing.
    None,
    /// The model decides.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Function(String),
}

/// A request's tools, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// May the answer hold several calls (OpenAI's default: yes).
    pub parallel: bool,
}

/// The request's tools and choice: every tool a function with a valid, unique name and an
/// object schema nested at most `max_depth` deep; a choice naming one of them. `None` when
/// the request gives no tools (and then neither a `tool_choice`).
pub fn tools(
    tools: Option<&[ToolIn]>,
    choice: Option<&ToolChoiceIn>,
    parallel: Option<bool>,
    max_depth: usize,
) -> Result<Option<Tools>, ValidationError> {
    let invalid = |param: String, message: &str| ValidationError::InvalidInput {
        param,
        message: message.into(),
    };
    let Some(given) = tools.filter(|t| !t.is_empty()) else {
        return match choice {
            Some(_) => Err(invalid("tool_choice".into(), "is only allowed when `tools` are given")),
            None => Ok(None),
        };
    };
    let mut checked: Vec<Tool> = Vec::with_capacity(given.len());
    for (i, tool) in given.iter().enumerate() {
        if tool.kind != "function" {
            return Err(invalid(format!("tools[{i}].type"), "must be \"function\""));
        }
        let function = &tool.function;
        if !valid_name(&function.name) {
            let message = "must be 1 to 64 letters, digits, underscores or dashes";
            return Err(invalid(format!("tools[{i}].function.name"), message));
        }
        if checked.iter().any(|t| t.name == function.name) {
            return Err(invalid(
                format!("tools[{i}].function.name"),
                "repeats an earlier tool's name",
            ));
        }
        let parameters = function.parameters.clone();
        let param = format!("tools[{i}].function.parameters");
        if let Some(parameters) = &parameters {
            if !parameters.is_object() {
                return Err(invalid(param, "must be a JSON schema object"));
            }
            super::structured::check_depth(parameters, &param, max_depth)?;
        }
        checked.push(Tool {
            name: function.name.clone(),
            description: function.description.clone(),
            parameters,
        });
    }
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(ToolChoiceIn::Mode(mode)) => match mode.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(invalid(
                    "tool_choice".into(),
                    "must be \"none\", \"auto\", \"required\" or a named function",
                ));
            }
        },
        Some(ToolChoiceIn::Named(named)) => {
            if named.kind != "function" {
                return Err(invalid("tool_choice.type".into(), "must be \"function\""));
            }
            let name = &named.function.name;
            if !checked.iter().any(|t| &t.name == name) {
                return Err(invalid("tool_choice.function.name".into(), "names no tool of `tools`"));
            }
            ToolChoice::Function(name.clone())
        }
    };
    Ok(Some(Tools {
        tools: checked,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// OpenAI's rule for function and schema names: 1 to 64 letters, digits, `_` or `-`.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(tools: Value, choice: Option<Value>) -> Result<Option<Tools>, ValidationError> {
        let tools: Vec<ToolIn> = serde_json::from_value(tools).unwrap();
        let choice: Option<ToolChoiceIn> = choice.map(|c| serde_json::from_value(c).unwrap());
        super::tools(Some(&tools), choice.as_ref(), None, 8)
    }

    fn param(result: Result<Option<Tools>, ValidationError>) -> String {
        result.unwrap_err().param().unwrap()
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tools_and_choices_read_as_openai_defines_them() {
        let tools = read(weather(), None).unwrap().unwrap();
        assert_eq!(
            (tools.tools[0].name.as_str(), &tools.choice, tools.parallel),
            ("get_weather", &ToolChoice::Auto, true)
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(
            read(weather(), Some(named)).unwrap().unwrap().choice,
            ToolChoice::Function("get_weather".into())
        );
        assert_eq!(
            read(weather(), Some(json!("required"))).unwrap().unwrap().choice,
            ToolChoice::Required
        );
        assert_eq!(
            read(weather(), Some(json!("none"))).unwrap().unwrap().choice,
            ToolChoice::None
        );
        let bare = read(json!([{"type": "function", "function": {"name": "now"}}]), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            bare.tools[0].schema(),
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        assert_eq!(
            bare.tools[0].as_json(),
            json!({"type": "function", "function": {"name": "now"}})
        );
        assert_eq!(tools_none(), None);
    }

    fn tools_none() -> Option<Tools> {
        super::tools(None, None, None, 8).unwrap()
    }

    #[test]
    fn each_bad_tool_or_choice_is_named() {
        let unknown = json!({"type": "function", "function": {"name": "get_time"}});
        assert_eq!(param(read(weather(), Some(unknown))), "tool_choice.function.name");
        assert_eq!(param(read(weather(), Some(json!("always")))), "tool_choice");
        let not_object = json!([{"type": "function", "function": {"name": "f", "parameters": [1]}}]);
        assert_eq!(param(read(not_object, None)), "tools[0].function.parameters");
        let bad_name = json!([{"type": "function", "function": {"name": "get weather"}}]);
        assert_eq!(param(read(bad_name, None)), "tools[0].function.name");
        let twice =
            json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]);
        assert_eq!(param(read(twice, None)), "tools[1].function.name");
        let not_function = json!([{"type": "code_interpreter", "function": {"name": "f"}}]);
        assert_eq!(param(read(not_function, None)), "tools[0].type");
        let choice: ToolChoiceIn = serde_json::from_value(json!("auto")).unwrap();
        assert_eq!(param(super::tools(None, Some(&choice), None, 8)), "tool_choice");
        let mut deep = json!({"type": "string"});
        for _ in 0..10 {
            deep = json!({"type": "object", "properties": {"a": deep}});
        }
        let deep = json!([{"type": "function", "function": {"name": "f", "parameters": deep}}]);
        assert_eq!(param(read(deep, None)), "tools[0].function.parameters");
    }
}
