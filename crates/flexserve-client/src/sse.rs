//! Reading server-sent events from a byte stream, line by line: `event:`
//! names an event, `data:` lines carry its body, a blank line ends it.

/// One event: its name (`message` when unnamed) and data.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// Longest line or event accepted: a sealed record in base64 is under 90 KiB.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Collects bytes and hands out whole events.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; appends every event they complete. An event or line
    /// longer than [`MAX_EVENT_BYTES`] is an error.
    pub fn push(&mut self, bytes: &[u8], events: &mut Vec<SseEvent>) -> Result<(), String> {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line(&line, events);
            } else {
                self.line.push(b);
            }
        }
        let pending = self.line.len() + self.data.as_ref().map_or(0, String::len);
        if pending > MAX_EVENT_BYTES {
            return Err(format!("a server-sent event longer than {MAX_EVENT_BYTES} bytes"));
        }
        Ok(())
    }

    /// The end of the stream: an event not closed by a blank line still counts.
    pub fn finish(&mut self, events: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.line(&line, events);
        }
        self.end_event(events);
    }

    fn end_event(&mut self, events: &mut Vec<SseEvent>) {
        let name = self.name.take().unwrap_or_else(|| "message".to_string());
        if let Some(data) = self.data.take() {
            events.push(SseEvent { name, data });
        }
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<SseEvent>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let value = |rest: &[u8]| String::from_utf8_lossy(rest.strip_prefix(b" ").unwrap_or(rest)).into_owned();
        if line.is_empty() {
            self.end_event(events);
        } else if let Some(rest) = line.strip_prefix(b"data:") {
            let rest = value(rest);
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(&rest);
                }
                None => self.data = Some(rest),
            }
        } else if let Some(rest) = line.strip_prefix(b"event:") {
            self.name = Some(value(rest));
        }
        // Comments (keep-alives) and the other fields (id, retry) are of no use here.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, data: &str) -> SseEvent {
        SseEvent { name: name.into(), data: data.into() }
    }

    #[test]
    fn events_split_across_pushes_and_line_endings() {
        let mut p = SseParser::default();
        let mut events = Vec::new();
        p.push(b"data: AAA", &mut events).unwrap();
        assert!(events.is_empty());
        p.push(b"A\n\n: keep-alive\n\nevent: error\ndata: {\"x\":1}\n\ndata: a\r\n\r\ndata: b\ndata: c\n", &mut events)
            .unwrap();
        p.finish(&mut events);
        assert_eq!(
            events,
            [event("message", "AAAA"), event("error", "{\"x\":1}"), event("message", "a"), event("message", "b\nc")]
        );
    }

    #[test]
    fn events_split_anywhere_come_out_whole() {
        let stream =
            b": keep-alive\n\ndata: {\"a\":1}\n\ndata: first\r\ndata: second\r\n\r\nevent: x\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut p = SseParser::default();
            let mut events = Vec::new();
            p.push(&stream[..split], &mut events).unwrap();
            p.push(&stream[split..], &mut events).unwrap();
            p.finish(&mut events);
            let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(data, ["{\"a\":1}", "first\nsecond", "[DONE]"], "split at {split}");
            assert_eq!(events[2].name, "x");
        }
        let mut p = SseParser::default();
        let mut events = Vec::new();
        p.push(b"data: [DONE]", &mut events).unwrap();
        assert!(events.is_empty());
        p.finish(&mut events);
        assert_eq!(events, [event("message", "[DONE]")]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut p = SseParser::default();
        let mut events = Vec::new();
        let chunk = vec![b'a'; 1 << 16];
        assert!((0..32).any(|_| p.push(&chunk, &mut events).is_err()));
    }
}
