//! JSON written as Python's `json.dumps` writes it (`ensure_ascii=False`): `", "` between
//! items and `": "` after keys, or one item per line with `indent`. Chat templates print
//! tools and tool-call arguments with `tojson`, which transformers maps to `json.dumps`, so
//! the prompt's tokens depend on these spaces.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter, Serializer};

/// serde_json's compact formatter with Python's default separators.
struct Spaced;

impl Formatter for Spaced {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`.
pub fn dumps<T: Serialize + ?Sized>(value: &T, indent: Option<usize>) -> serde_json::Result<String> {
    let mut out = Vec::new();
    match indent {
        None => value.serialize(&mut Serializer::with_formatter(&mut out, Spaced))?,
        Some(width) => {
            let spaces = vec![b' '; width];
            value.serialize(&mut Serializer::with_formatter(
                &mut out,
                PrettyFormatter::with_indent(&spaces),
            ))?
        }
    }
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::dumps;

    #[test]
    fn separators_and_indents_are_python_s() {
        let value = json!({"name": "get_weather", "b": [1, 2.5, null], "e": {}, "s": "é\n\"", "a": []});
        // json.dumps(value, ensure_ascii=False), keys in the order given.
        assert_eq!(
            dumps(&value, None).unwrap(),
            r#"{"name": "get_weather", "b": [1, 2.5, null], "e": {}, "s": "é\n\"", "a": []}"#
        );
        assert_eq!(
            dumps(&json!({"a": [1]}), Some(2)).unwrap(),
            "{\n  \"a\": [\n    1\n  ]\n}"
        );
    }
}
