//! One module a subcommand; each only wires settings to the crates and
//! decides nothing a library user would need.

use std::time::Duration;

pub mod api;
pub mod apikey;
pub mod bench;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod keys;
pub mod send;
pub mod signal;
pub mod status;
pub mod topology;
pub mod worker;

/// `text` as a terminal may show it: control characters (escape
/// sequences, line breaks) written as escapes, so a value a publisher or a
/// relay chose cannot rewrite the screen or forge a line; cut to `max`
/// characters with `…`.
pub fn shown(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push('…');
            break;
        }
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest span a flag may add to now: far enough for any key or job,
/// near enough that the date it gives exists (adding 10⁹ days panicked).
const MAX_SPAN: Duration = Duration::from_hours(100 * 365 * 24);

/// Parses a span from now such as `90d`: at most 100 years.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    let span = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is not a span of time; use e.g. 90d, 12h, 30m"))?;
    if span > MAX_SPAN {
        return Err("at most 100 years".to_owned());
    }
    Ok(span)
}

/// [`parse_span`], above zero: a lifetime that would end as it starts.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let span = parse_span(text)?;
    if span.is_zero() {
        return Err("must be above zero".to_owned());
    }
    Ok(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_text_cannot_drive_the_terminal() {
        assert_eq!(shown("plain text", 80), "plain text");
        assert_eq!(shown("a\x1b]0;title\x07b", 80), "a\\u{1b}]0;title\\u{7}b");
        assert_eq!(shown("one\r\nfake row", 80), "one\\r\\nfake row");
        assert_eq!(shown("\u{202e}txt.exe", 80), "\\u{202e}txt.exe");
        assert_eq!(shown(&"é".repeat(10), 4), "éééé…");
    }

    #[test]
    fn spans_are_bounded_and_lifetimes_above_zero() {
        assert_eq!(parse_span("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_lifetime("90d"), Ok(Duration::from_hours(90 * 24)));
        assert!(parse_lifetime("0s").is_err_and(|e| e.contains("above zero")));
        assert!(parse_span("1000000000d").is_err_and(|e| e.contains("100 years")));
        assert!(parse_span("soon").is_err_and(|e| e.contains("e.g. 90d")));
    }
}
