//! What every benchmark reports: rate, latency percentiles, peak memory.

use std::time::Duration;

/// Latencies of one run and how long it took.
pub struct Run {
    /// Printed name.
    pub label: &'static str,
    /// One latency per message, when measured.
    pub latencies: Vec<Duration>,
    /// Messages handled.
    pub count: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Peak resident memory, when measured.
    pub peak_rss_kib: Option<u64>,
    /// CPU time (user + system) this process spent during the run.
    pub cpu: Option<Duration>,
}

impl Run {
    /// A run of `latencies.len()` messages.
    pub fn new(label: &'static str, mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Self {
            label,
            count: latencies.len(),
            latencies,
            elapsed,
            peak_rss_kib: None,
            cpu: None,
        }
    }

    /// A run of `count` messages whose latencies were not measured.
    pub fn counted(label: &'static str, count: usize, elapsed: Duration) -> Self {
        let mut run = Self::new(label, Vec::new(), elapsed);
        run.count = count;
        run
    }

    /// Several runs of one kind as one: latencies pooled, messages and times
    /// summed, memory and CPU at their peak and total.
    pub fn merge(label: &'static str, runs: Vec<Run>) -> Self {
        let mut merged = Run::new(label, Vec::new(), Duration::ZERO);
        for run in runs {
            merged.latencies.extend(run.latencies);
            merged.count += run.count;
            merged.elapsed += run.elapsed;
            merged.peak_rss_kib = merged.peak_rss_kib.max(run.peak_rss_kib);
            merged.cpu = match (merged.cpu, run.cpu) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
        }
        merged.latencies.sort_unstable();
        merged
    }

    /// Messages a second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`th percentile (0..=100) latency, if latencies were measured.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let rank = (p / 100.0 * (self.latencies.len() - 1) as f64).round() as usize;
        Some(self.latencies[rank.min(self.latencies.len() - 1)])
    }

    /// One line: rate, percentiles, memory, CPU.
    pub fn report(&self) -> String {
        let ms = |p| {
            self.percentile(p).map_or_else(
                || "      -".to_owned(),
                |d: Duration| format!("{:>7.2}", d.as_secs_f64() * 1e3),
            )
        };
        let mut line = format!(
            "{:<34} {:>9.0} /s   p50 {} ms   p95 {} ms   p99 {} ms",
            self.label,
            self.rate(),
            ms(50.0),
            ms(95.0),
            ms(99.0)
        );
        if let Some(kib) = self.peak_rss_kib {
            line.push_str(&format!("   peak RSS {:.1} MiB", kib as f64 / 1024.0));
        }
        if let Some(cpu) = self.cpu {
            line.push_str(&format!(
                "   CPU {:.1} us/msg",
                cpu.as_secs_f64() * 1e6 / self.count.max(1) as f64
            ));
        }
        line
    }
}

/// One kind's rates, round by round.
pub fn print_rates(name: &str, runs: &[Run]) {
    let rates: Vec<f64> = runs.iter().map(Run::rate).collect();
    println!("  rounds, {name}: {} /s", listed(&rates, 0));
}

/// `ours`' ratio to `ceilings` (a rate per round) round by round, and
/// their median. A round's runs were back to back, so a round's ratio is
/// less exposed to the broker's drift than the pooled one, and the spread
/// of the rounds shows how much one run can be trusted.
pub fn print_ratios(name: &str, ours: &[Run], ceilings: &[f64]) {
    let mut ratios: Vec<f64> = ours
        .iter()
        .zip(ceilings)
        .map(|(ours, ceiling)| ours.rate() / ceiling)
        .collect();
    let shown = listed(&ratios, 2);
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    println!("  ratio by round, {name}: {shown} (median {median:.2})");
}

fn listed(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|value| format!("{value:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resets the kernel's peak-RSS mark of this process (Linux), so each phase
/// reports its own peak.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process since the last reset (Linux).
pub fn peak_rss_kib() -> Option<u64> {
    peak_rss_kib_of("self")
}

/// Peak resident set size of process `pid` (`"self"` for this one).
pub fn peak_rss_kib_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time (user + system) this process has used so far (Linux).
pub fn cpu_time() -> Option<Duration> {
    cpu_time_of("self")
}

/// CPU time (user + system) process `pid` has used so far (Linux).
pub fn cpu_time_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them, in clock ticks.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(clock_ticks(utime + stime))
}

/// `ticks` of `/proc`'s clock as time: the kernel's USER_HZ is 100 on
/// every Linux this runs on.
pub fn clock_ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
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
        let run = Run::new(
            "t",
            (1..=100).rev().map(Duration::from_millis).collect(),
            Duration::from_secs(1),
        );
        assert_eq!(run.percentile(50.0), Some(Duration::from_millis(51)));
        assert_eq!(run.percentile(99.0), Some(Duration::from_millis(99)));
        assert!((run.rate() - 100.0).abs() < 1e-9);
    }
}
