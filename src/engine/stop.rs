//! Stop strings, honoured across token boundaries and never emitted: text that could be the
//! start of a stop string is held back until the next tokens show whether it is.

#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text produced and not yet released.
    held: String,
}

/// What a piece of new text leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Release this text (possibly empty); no stop string yet.
    Continue(String),
    /// A stop string was found: release this text, which ends just before it, and stop.
    Stop(String),
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(text.to_string());
        }
        self.held.push_str(text);
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_stop {
            let released = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stop(released);
        }
        let keep = self.partial_stop_suffix();
        let release_to = self.held.len() - keep;
        let released = self.held[..release_to].to_string();
        self.held.drain(..release_to);
        StopCheck::Continue(released)
    }

    /// Held text, released when the sequence ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that begins some stop string.
    fn partial_stop_suffix(&self) -> usize {
        let mut longest = 0;
        for (start, _) in self.held.char_indices() {
            let suffix = &self.held[start..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                longest = longest.max(suffix.len());
                break; // char_indices go left to right: the first match is the longest
            }
        }
        longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_string_split_across_tokens_is_found_and_not_emitted() {
        let mut stops = StopStrings::new(vec!["END".into()]);
        assert_eq!(stops.push("The answer E"), StopCheck::Continue("The answer ".into()));
        assert_eq!(stops.push("N"), StopCheck::Continue(String::new()));
        assert_eq!(stops.push("D and more"), StopCheck::Stop(String::new()));
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_be_a_stop() {
        let mut stops = StopStrings::new(vec!["END".into()]);
        assert_eq!(stops.push("EN"), StopCheck::Continue(String::new()));
        assert_eq!(stops.push("TRY"), StopCheck::Continue("ENTRY".into()));
        assert_eq!(stops.push(" E"), StopCheck::Continue(" ".into()));
        assert_eq!(stops.flush(), "E");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut stops = StopStrings::new(vec!["world".into(), "lo w".into()]);
        assert_eq!(stops.push("hello world"), StopCheck::Stop("hel".into()));
    }

    #[test]
    fn without_stops_text_passes_through() {
        let mut stops = StopStrings::new(vec![String::new()]);
        assert_eq!(stops.push("anything"), StopCheck::Continue("anything".into()));
    }
}
