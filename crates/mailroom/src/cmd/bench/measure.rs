//! What every benchmark reports: rate, latency percentiles, peak memory.

// Counts and ranks here are far below 2^52; float arithmetic on them is exact
// enough for figures printed with two decimals.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::time::Duration;

/// Latencies of one run and how long it took.
pub struct Run {
    pub label: &'static str,
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
    pub peak_rss_kib: Option<u64>,
    /// CPU time (user + system) this process spent during the run.
    pub cpu: Option<Duration>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`th percentile (0..=100) latency.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        self.latencies.sort_unstable();
        let rank = (p / 100.0 * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }

    pub fn report(&mut self) -> String {
        let rss = self.peak_rss_kib.map_or_else(
            || "n/a".to_owned(),
            |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
        );
        let cpu = self.cpu.map_or_else(
            || "n/a".to_owned(),
            |cpu| {
                format!(
                    "{:.1} us/job",
                    cpu.as_secs_f64() * 1e6 / self.latencies.len().max(1) as f64
                )
            },
        );
        let p50 = self.percentile(50.0).as_secs_f64() * 1e3;
        let p99 = self.percentile(99.0).as_secs_f64() * 1e3;
        format!(
            "{:<28} {:>9.0} /s   p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   peak RSS {rss}   client CPU {cpu}",
            self.label,
            self.rate(),
        )
    }
}

/// Resets the kernel's peak-RSS mark of this process (Linux), so each phase
/// reports its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process since the last reset (Linux).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) this process has used so far (Linux).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // The kernel's USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// CPU time used since `start` (a [`cpu_time`] reading).
pub fn cpu_used_since(start: Option<Duration>) -> Option<Duration> {
    Some(cpu_time()?.saturating_sub(start?))
}

/// Parses sizes like `2KiB`, `512`, `1MiB`, `4kB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a size like 2KiB"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1024,
        "kb" => 1000,
        "mib" | "m" => 1024 * 1024,
        "mb" => 1_000_000,
        other => return Err(format!("unknown size unit {other:?}: use B, KiB, MiB")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert!(parse_size("2 parsecs").is_err());
    }

    #[test]
    fn percentiles_pick_ranks() {
        let mut run = Run {
            label: "t",
            latencies: (1..=100).map(Duration::from_millis).collect(),
            elapsed: Duration::from_secs(1),
            peak_rss_kib: None,
            cpu: None,
        };
        assert_eq!(run.percentile(50.0), Duration::from_millis(51));
        assert_eq!(run.percentile(99.0), Duration::from_millis(99));
        assert!((run.rate() - 100.0).abs() < 1e-9);
    }
}
