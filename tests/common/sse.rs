//! The tests' reader of server-sent events: a body split into events, each with its `event:`
//! name and its `data:` lines joined by newlines, as the SSE specification reads them (a
//! line ends with LF, CR or CRLF; one space after the colon is dropped; `:` lines are
//! comments; an event ends at a blank line, and one without data is no event). No
//! dependencies: fuzz/targets.rs fuzzes it.

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

pub fn parse(body: &str) -> Vec<SseEvent> {
    let mut events = Vec::new();
    let (mut event, mut data, mut has_data) = (None, String::new(), false);
    let normalised = body.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalised.split('\n') {
        if line.is_empty() {
            if has_data {
                events.push(SseEvent {
                    event: event.take(),
                    data: std::mem::take(&mut data),
                });
            }
            (event, has_data) = (None, false);
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_string()),
            "data" => {
                if has_data {
                    data.push('\n');
                }
                data.push_str(value);
                has_data = true;
            }
            _ => {} // comments (an empty field), `id`, `retry`, and unknown fields
        }
    }
    events
}
