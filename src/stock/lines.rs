//! Splitting a streamed code-import body into codes, with memory bounded by the longest
//! line we are willing to hold, whatever the body's size.

/// The longest code accepted, in bytes, after trimming.
pub const CODE_MAX_BYTES: usize = 512;
/// Raw bytes held for one line, leading ASCII whitespace not counted: room for a code
/// and generous padding. Past it only whether more than padding follows is kept, so a
/// padded code or a long blank line is still read as the contract says.
const LINE_BUFFER_MAX_BYTES: usize = 4096;
const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Code(&'a str),
    /// Over `CODE_MAX_BYTES`, not UTF-8, or holding control characters.
    Rejected,
    /// Empty after trimming: ignored, not counted.
    Blank,
}

#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    /// The line went past the buffer: what did not fit was dropped.
    overflow: bool,
    /// What was dropped held more than ASCII whitespace, so the trimmed line is longer
    /// than any code.
    lost: bool,
    started: bool,
}

impl Splitter {
    /// Feeds one chunk of the body; `emit` is called for every line it completes.
    pub fn push(&mut self, mut chunk: &[u8], emit: &mut impl FnMut(Line<'_>)) {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            self.take(&chunk[..nl]);
            self.end_line(emit);
            chunk = &chunk[nl + 1..];
        }
        self.take(chunk);
    }

    /// Ends the body: the last line needs no newline.
    pub fn finish(&mut self, emit: &mut impl FnMut(Line<'_>)) {
        if !self.buf.is_empty() || self.overflow {
            self.end_line(emit);
        }
    }

    fn take(&mut self, mut part: &[u8]) {
        let padding = |p: &[u8]| p.iter().all(u8::is_ascii_whitespace);
        if self.overflow {
            self.lost |= !padding(part);
            return;
        }
        if self.buf.is_empty() {
            let skip = part.iter().take_while(|b| b.is_ascii_whitespace()).count();
            part = &part[skip..];
        }
        let room = LINE_BUFFER_MAX_BYTES - self.buf.len();
        if part.len() > room {
            self.buf.extend_from_slice(&part[..room]);
            self.overflow = true;
            self.lost = !padding(&part[room..]);
            return;
        }
        self.buf.extend_from_slice(part);
    }

    fn end_line(&mut self, emit: &mut impl FnMut(Line<'_>)) {
        let first = !self.started;
        self.started = true;
        self.overflow = false;
        if std::mem::take(&mut self.lost) {
            self.buf.clear();
            emit(Line::Rejected);
            return;
        }
        let mut raw = &self.buf[..];
        if first {
            raw = raw.strip_prefix(BOM).unwrap_or(raw);
        }
        let line = match std::str::from_utf8(raw) {
            Err(_) => Line::Rejected,
            Ok(s) => {
                let code = s.trim();
                if code.is_empty() {
                    Line::Blank
                } else if code.len() > CODE_MAX_BYTES || code.chars().any(char::is_control) {
                    Line::Rejected
                } else {
                    Line::Code(code)
                }
            }
        };
        emit(line);
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut s = Splitter::default();
        let mut emit = |l: Line<'_>| {
            out.push(match l {
                Line::Code(c) => c.to_string(),
                Line::Rejected => "<rejected>".into(),
                Line::Blank => "<blank>".into(),
            })
        };
        for c in chunks {
            s.push(c, &mut emit);
        }
        s.finish(&mut emit);
        out
    }

    #[test]
    fn trims_crlf_and_whitespace_and_strips_a_bom() {
        assert_eq!(
            split(&[b"\xEF\xBB\xBFA1\r\n  B2 \t\r\n\r\nC3"]),
            ["A1", "B2", "<blank>", "C3"]
        );
    }

    #[test]
    fn lines_may_straddle_chunks() {
        assert_eq!(split(&[b"AB", b"C\nD", b"", b"E\n"]), ["ABC", "DE"]);
    }

    #[test]
    fn rejects_long_lines_bad_utf8_and_control_characters() {
        let long = "x".repeat(CODE_MAX_BYTES + 1);
        let exact = "y".repeat(CODE_MAX_BYTES);
        let huge = vec![b'z'; 100_000];
        let body = format!("{long}\n{exact}\nok\n");
        assert_eq!(split(&[body.as_bytes()]), ["<rejected>", exact.as_str(), "ok"]);
        assert_eq!(split(&[b"\xFF\xFE\nfine\n"]), ["<rejected>", "fine"]);
        assert_eq!(split(&[b"a\x00b\nc\n"]), ["<rejected>", "c"]);
        assert_eq!(split(&[&huge, b"\nafter"]), ["<rejected>", "after"]);
    }

    #[test]
    fn padding_past_the_buffer_is_still_trimmed() {
        let pad = " ".repeat(LINE_BUFFER_MAX_BYTES + 10);
        let padded = format!("{pad}CODE-1\t{pad}\r\n{pad}\nnext");
        assert_eq!(split(&[padded.as_bytes()]), ["CODE-1", "<blank>", "next"]);
        // In pieces, the padding straddling chunks.
        assert_eq!(
            split(&[pad.as_bytes(), b"CODE-2", pad.as_bytes(), pad.as_bytes(), b"\nnext"]),
            ["CODE-2", "next"]
        );
        // Content past the buffer makes the trimmed line too long, wherever it is.
        let far = format!("A{pad}B\nnext");
        assert_eq!(split(&[far.as_bytes()]), ["<rejected>", "next"]);
        assert_eq!(split(&[b"A", pad.as_bytes(), b"B\nnext"]), ["<rejected>", "next"]);
    }

    #[test]
    fn a_bom_is_only_special_at_the_start() {
        assert_eq!(split(&[b"A\n\xEF\xBB\xBFB\n"]), ["A", "\u{feff}B"]);
    }
}
