//! The jobs of a `--json` input, one at a time: NDJSON line by line, or one
//! pretty-printed job. Read as they are sent, so a file of millions of jobs
//! takes the memory of a chunk, not of the file.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read as _};

/// An over-long line is skipped to its end, but not past this many times
/// the longest line allowed: no job file holds such a line.
const GIVE_UP_AFTER_LINES: usize = 16;

/// What Windows editors put before UTF-8 text.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One job's text, or why its line cannot hold one.
pub struct Entry {
    /// Line number (from 1) where the job starts.
    pub line: usize,
    /// The JSON text, or the reason the line was refused.
    pub json: Result<String, String>,
}

/// Reads entries from a buffered input.
pub struct Entries<R> {
    reader: R,
    /// A line longer than this is refused unread: no valid job comes near.
    max_line: usize,
    /// Lines read so far.
    line: usize,
    /// Bytes read so far, for a progress bar.
    consumed: u64,
    /// Lines read ahead to look for a pretty-printed job, then not one.
    pending: VecDeque<Entry>,
    started: bool,
}

impl<R: BufRead> Entries<R> {
    /// Entries of `reader`, refusing lines over `max_line` bytes.
    pub fn new(reader: R, max_line: usize) -> Self {
        Self {
            reader,
            max_line,
            line: 0,
            consumed: 0,
            pending: VecDeque::new(),
            started: false,
        }
    }

    /// Bytes of the input read so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The next entry; `None` at the end of the input. Blank lines are
    /// skipped. An error is the input's own (a read that failed).
    pub fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        if !self.started {
            self.started = true;
            return self.first();
        }
        if let Some(entry) = self.pending.pop_front() {
            return Ok(Some(entry));
        }
        self.next_line()
    }

    /// The first entry. A first line that opens an object it does not close
    /// starts a pretty-printed job: the whole input (up to `max_line`) is
    /// that job if it parses as one JSON value, and NDJSON otherwise.
    fn first(&mut self) -> io::Result<Option<Entry>> {
        let Some(first) = self.next_line()? else {
            return Ok(None);
        };
        let opens_object = matches!(&first.json, Ok(text)
            if text.trim_start().starts_with('{') && !is_json(text));
        if !opens_object {
            return Ok(Some(first));
        }
        let mut document = first.json.as_deref().unwrap_or_default().to_owned();
        let mut read_ahead = VecDeque::new();
        let mut fits = true;
        while let Some(entry) = self.next_line()? {
            if let Ok(text) = &entry.json
                && document.len() + text.len() < self.max_line
            {
                document.push('\n');
                document.push_str(text);
            } else {
                fits = false;
            }
            read_ahead.push_back(entry);
            if !fits {
                break;
            }
        }
        if fits && is_json(&document) {
            return Ok(Some(Entry {
                line: first.line,
                json: Ok(document),
            }));
        }
        self.pending = read_ahead;
        Ok(Some(first))
    }

    /// The next non-blank line, as text or as the reason it is refused.
    fn next_line(&mut self) -> io::Result<Option<Entry>> {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let limit = u64::try_from(self.max_line)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            let read = self
                .reader
                .by_ref()
                .take(limit)
                .read_until(b'\n', &mut buf)?;
            if read == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.consumed += read as u64;
            let line = self.line;
            if buf.len() > self.max_line && buf.last() != Some(&b'\n') {
                let most = self.max_line.saturating_mul(GIVE_UP_AFTER_LINES);
                self.consumed += skip_line(&mut self.reader, most)
                    .map_err(|err| io::Error::new(err.kind(), format!("line {line}: {err}")))?;
                let reason = format!("longer than {} bytes: not a job", self.max_line);
                return Ok(Some(Entry {
                    line,
                    json: Err(reason),
                }));
            }
            let mut bytes = buf.as_slice();
            if line == 1 {
                bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
            }
            let bytes = bytes.trim_ascii_end();
            if bytes.trim_ascii_start().is_empty() {
                continue;
            }
            let json = std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|err| format!("not UTF-8 text (byte {})", err.valid_up_to() + 1));
            return Ok(Some(Entry { line, json }));
        }
    }
}

/// Whether `text` is one complete JSON value.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// Reads past the end of the current line, up to `most` bytes; returns the
/// bytes skipped. A line with no end in sight (`/dev/zero`, a disk image)
/// is an error rather than an endless read.
fn skip_line(reader: &mut impl BufRead, most: usize) -> io::Result<u64> {
    let mut skipped = 0;
    loop {
        if skipped > most as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no line end in {skipped} bytes: this input is not NDJSON"),
            ));
        }
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(skipped);
        }
        let (used, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (buf.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if done {
            return Ok(skipped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(input: &[u8], max_line: usize) -> Vec<(usize, Result<String, String>)> {
        let mut entries = Entries::new(input, max_line);
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().expect("in-memory input") {
            out.push((entry.line, entry.json));
        }
        assert_eq!(entries.consumed(), input.len() as u64, "every byte counted");
        out
    }

    #[test]
    fn ndjson_lines_keep_their_numbers_and_blank_lines_are_skipped() {
        let got = entries(b"{\"a\":1}\r\n\n  \r\n{\"b\":2}\nnot json", 100);
        assert_eq!(
            got,
            [
                (1, Ok("{\"a\":1}".to_owned())),
                (4, Ok("{\"b\":2}".to_owned())),
                (5, Ok("not json".to_owned())),
            ]
        );
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let got = entries(b"\xEF\xBB\xBF{\"a\":1}\n", 100);
        assert_eq!(got, [(1, Ok("{\"a\":1}".to_owned()))]);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_refused_alone() {
        let got = entries(b"{\"a\":1}\n\"\xFF\xFE\"\n{\"b\":2}\n", 100);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].0, 2);
        assert!(got[1].1.as_ref().is_err_and(|e| e.contains("not UTF-8")));
        assert!(got[2].1.is_ok());
    }

    #[test]
    fn an_overlong_line_is_refused_unread_and_the_next_one_is_read() {
        let long = format!("{{\"a\":\"{}\"}}\n{{\"b\":2}}\n", "x".repeat(10_000));
        let got = entries(long.as_bytes(), 100);
        assert_eq!(got.len(), 2);
        assert!(
            got[0]
                .1
                .as_ref()
                .is_err_and(|e| e.contains("longer than 100 bytes"))
        );
        assert_eq!(got[1], (2, Ok("{\"b\":2}".to_owned())));
    }

    #[test]
    fn a_line_without_end_stops_the_reading_instead_of_running_forever() {
        let endless = io::BufReader::new(io::repeat(0));
        let mut entries = Entries::new(endless, 100);
        let first = entries.next_entry().map(|entry| entry.map(|e| e.line));
        let err = first.expect_err("an endless line is an error");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().starts_with("line 1: no line end"), "{err}");
    }

    #[test]
    fn a_pretty_printed_job_is_one_entry() {
        let got = entries(b"\n{\n  \"a\": {\n    \"b\": 1\n  }\n}\n", 1_000);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 2);
        assert!(got[0].1.as_ref().is_ok_and(|text| is_json(text)));
    }

    #[test]
    fn a_broken_first_line_is_refused_and_the_rest_still_read() {
        let got = entries(b"{\"a\":\n{\"b\":2}\n{\"c\":3}\n", 1_000);
        let lines: Vec<usize> = got.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 3]);
        assert_eq!(got[0].1.as_deref(), Ok("{\"a\":"));
        assert_eq!(got[2].1.as_deref(), Ok("{\"c\":3}"));
    }

    #[test]
    fn a_pretty_printed_job_larger_than_the_limit_falls_back_to_lines() {
        let input = format!("{{\n\"a\": \"{}\"\n}}\n", "x".repeat(50));
        let got = entries(input.as_bytes(), 40);
        assert!(got.len() > 1, "{got:?}");
        assert_eq!(got[0], (1, Ok("{".to_owned())));
    }
}
