//! Where the machine's CPU went during a run: the worker's, each local
//! service's, and the idle time of every core. On a machine this small the
//! sum is the limit, so a drain's rate is read beside what each process
//! took of it.

use std::time::Duration;

use super::measure::{clock_ticks, cpu_time_of};

/// The processes a drain shares the machine with, by command name; every
/// process of a name is counted.
const NEIGHBOURS: [&str; 3] = ["redis-server", "beam.smp", "smtp-sink"];

/// CPU time by part, as read at one moment or as spent between two.
#[derive(Clone, Debug, Default)]
pub struct CpuSplit {
    /// The worker first, then each neighbour found.
    parts: Vec<(&'static str, Duration)>,
    /// Idle time, summed over the cores.
    idle: Duration,
}

impl CpuSplit {
    /// CPU time used so far by process `worker` and the neighbours, and the
    /// machine's idle time; `None` where `/proc` cannot tell (not Linux).
    pub fn read(worker: u32) -> Option<Self> {
        let mut parts = vec![("worker", cpu_time_of(&worker.to_string())?)];
        for name in NEIGHBOURS {
            let pids = pids_named(name);
            if !pids.is_empty() {
                let used = pids.iter().filter_map(|pid| cpu_time_of(pid)).sum();
                parts.push((name, used));
            }
        }
        Some(Self {
            parts,
            idle: idle_time()?,
        })
    }

    /// What was spent from `start` to `self`.
    pub fn since(&self, start: &Self) -> Self {
        let parts = self
            .parts
            .iter()
            .map(|&(name, now)| {
                let then = start.part(name).unwrap_or(now);
                (name, now.saturating_sub(then))
            })
            .collect();
        Self {
            parts,
            idle: self.idle.saturating_sub(start.idle),
        }
    }

    /// `self` and `other` together (spans of time, not readings).
    pub fn add(&mut self, other: &Self) {
        for &(name, spent) in &other.parts {
            match self.parts.iter_mut().find(|(own, _)| *own == name) {
                Some((_, total)) => *total += spent,
                None => self.parts.push((name, spent)),
            }
        }
        self.idle += other.idle;
    }

    /// Each part a job, e.g. `worker 60.2, redis-server 14.1, idle 6.0 us/job`.
    pub fn per_job(&self, jobs: usize) -> String {
        let per_job = |spent: Duration| spent.as_secs_f64() * 1e6 / jobs.max(1) as f64;
        let mut shown: Vec<String> = self
            .parts
            .iter()
            .map(|&(name, spent)| format!("{name} {:.1}", per_job(spent)))
            .collect();
        shown.push(format!("idle {:.1}", per_job(self.idle)));
        format!("{} us/job", shown.join(", "))
    }

    fn part(&self, name: &str) -> Option<Duration> {
        self.parts
            .iter()
            .find(|(own, _)| *own == name)
            .map(|&(_, spent)| spent)
    }
}

/// Pids of the processes whose command is `name`.
fn pids_named(name: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// The machine's idle time so far, every core's summed (idle and iowait
/// of `/proc/stat`).
fn idle_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some(clock_ticks(idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(parts: &[(&'static str, u64)], idle: u64) -> CpuSplit {
        CpuSplit {
            parts: parts
                .iter()
                .map(|&(name, ms)| (name, Duration::from_millis(ms)))
                .collect(),
            idle: Duration::from_millis(idle),
        }
    }

    #[test]
    fn spans_are_differences_and_add_up_by_name() {
        let start = split(&[("worker", 100), ("beam.smp", 1_000)], 50);
        let end = split(
            &[("worker", 700), ("beam.smp", 1_300), ("smtp-sink", 40)],
            90,
        );
        let mut total = end.since(&start);
        assert_eq!(
            total.per_job(1_000),
            "worker 600.0, beam.smp 300.0, smtp-sink 0.0, idle 40.0 us/job"
        );
        total.add(&split(&[("smtp-sink", 200), ("worker", 400)], 10));
        assert_eq!(
            total.per_job(2_000),
            "worker 500.0, beam.smp 150.0, smtp-sink 100.0, idle 25.0 us/job"
        );
    }

    #[test]
    fn this_process_and_the_machine_are_read_on_linux() {
        // `None` if /proc/stat or this process's stat did not parse.
        let read = CpuSplit::read(std::process::id()).expect("/proc is readable on Linux");
        assert_eq!(read.parts[0].0, "worker");
    }
}
