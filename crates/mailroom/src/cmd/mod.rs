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
    fn spans_are_bounded_and_lifetimes_above_zero() {
        assert_eq!(parse_span("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_lifetime("90d"), Ok(Duration::from_hours(90 * 24)));
        assert!(parse_lifetime("0s").is_err_and(|e| e.contains("above zero")));
        assert!(parse_span("1000000000d").is_err_and(|e| e.contains("100 years")));
        assert!(parse_span("soon").is_err_and(|e| e.contains("e.g. 90d")));
    }
}
