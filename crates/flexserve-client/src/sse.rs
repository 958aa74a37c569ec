//! Reading server-sent events from a byte stream: events end at a blank
//! line; `event:` names one, `data:` lines carry its body.

/// One event: its name (`message` when unnamed) and data.
#[derive(Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// Collects bytes and hands out whole events.
#[derive(Default)]
pub struct SseReader {
    buffer: Vec<u8>,
}

/// Longest event accepted: a sealed record in base64 is under 90 KiB.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

impl SseReader {
    /// Adds bytes; returns the events they complete, or an error past the bound.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = find_blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end.0).collect();
            self.buffer.drain(..end.1 - end.0);
            let text = String::from_utf8_lossy(&block);
            let mut name = String::from("message");
            let mut data = Vec::new();
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
                // Comments (":") and other fields (id, retry) are ignored.
            }
            if !data.is_empty() {
                events.push(SseEvent { name, data: data.join("\n") });
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err(format!("a server-sent event longer than {MAX_EVENT_BYTES} bytes"));
        }
        Ok(events)
    }
}

/// The end of the first event's text and the start of what follows it.
fn find_blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2));
    let crlf = buffer.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_pushes() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: AAA").unwrap().is_empty());
        let events = r.push(b"A\n\n: keep-alive\n\nevent: error\ndata: {\"x\":1}\n\n").unwrap();
        assert_eq!(
            events,
            [
                SseEvent { name: "message".into(), data: "AAAA".into() },
                SseEvent { name: "error".into(), data: "{\"x\":1}".into() }
            ]
        );
        assert_eq!(r.push(b"data: a\r\n\r\n").unwrap(), [SseEvent { name: "message".into(), data: "a".into() }]);
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut r = SseReader::default();
        let chunk = vec![b'a'; 1 << 16];
        let mut failed = false;
        for _ in 0..32 {
            if r.push(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }
}
