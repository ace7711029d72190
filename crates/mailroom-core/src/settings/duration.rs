//! Durations in settings as human text (`30s`, `24h`, `1h 30m`) or seconds.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Serializes a duration in its largest whole unit (`24h`, `90s`,
/// `1500ms`), as the settings table writes them.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    let ms = d.as_millis();
    let text = match ms {
        0 => "0s".to_owned(),
        _ if !d.subsec_nanos().is_multiple_of(1_000_000) => {
            humantime::format_duration(*d).to_string()
        }
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ => format!("{ms}ms"),
    };
    s.serialize_str(&text)
}

/// Reads `"30s"`-style text or a number of seconds (`1.5` is 1.5 s).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

const EXAMPLES: &str = "use e.g. \"500ms\", \"30s\", \"10m\", \"24h\", or a number of seconds";

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a duration ({EXAMPLES})")
    }

    fn visit_u64<E: de::Error>(self, secs: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(secs))
    }

    fn visit_i64<E: de::Error>(self, secs: i64) -> Result<Duration, E> {
        u64::try_from(secs)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(format!("{secs} is not a duration: it cannot be negative")))
    }

    fn visit_f64<E: de::Error>(self, secs: f64) -> Result<Duration, E> {
        Duration::try_from_secs_f64(secs)
            .map_err(|_| E::custom(format!("{secs} is not a duration ({EXAMPLES})")))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        humantime::parse_duration(text.trim())
            .map_err(|_| E::custom(format!("{text:?} is not a duration ({EXAMPLES})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Holder(#[serde(with = "super")] Duration);

    fn read(json: &str) -> Result<Duration, String> {
        serde_json::from_str::<Holder>(json)
            .map(|holder| holder.0)
            .map_err(|err| err.to_string())
    }

    #[test]
    fn text_seconds_and_fractions_read_and_the_rest_says_what_is_allowed() {
        assert_eq!(read("\"30s\""), Ok(Duration::from_secs(30)));
        assert_eq!(read("\"1h 30m\""), Ok(Duration::from_mins(90)));
        assert_eq!(read("90"), Ok(Duration::from_secs(90)));
        assert_eq!(read("1.5"), Ok(Duration::from_millis(1500)));
        for (json, says) in [
            ("-5", "cannot be negative"),
            ("-1.5", "-1.5 is not a duration"),
            ("\"soon\"", "\"soon\" is not a duration"),
            ("true", "a duration"),
        ] {
            let err = read(json).expect_err(json);
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[test]
    fn durations_print_in_their_largest_whole_unit() {
        let shown = |d| serde_json::to_string(&Holder(d)).expect("serializes");
        assert_eq!(shown(Duration::from_hours(24)), "\"24h\"");
        assert_eq!(shown(Duration::from_hours(7 * 24)), "\"168h\"");
        assert_eq!(shown(Duration::from_secs(90)), "\"90s\"");
        assert_eq!(shown(Duration::from_mins(10)), "\"10m\"");
        assert_eq!(shown(Duration::from_millis(1500)), "\"1500ms\"");
        assert_eq!(shown(Duration::ZERO), "\"0s\"");
        for d in [86_400, 90, 600] {
            let d = Duration::from_secs(d);
            assert_eq!(read(&shown(d)), Ok(d), "round trip");
        }
    }
}
