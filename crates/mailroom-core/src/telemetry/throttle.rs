//! Warnings that an outage repeats for every job or request, let through
//! at most once a second: a Redis down for a minute under load would
//! otherwise log a line a job (50 a second a worker in a black-box run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// One warning's throttle; a `static` beside the warning.
pub struct OncePerSecond {
    second: AtomicU64,
    held: AtomicU64,
}

impl OncePerSecond {
    /// A throttle that lets the first warning through.
    #[allow(clippy::new_without_default)] // A `static` needs a const fn.
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this occurrence may be logged, `n` being how many were
    /// held back since the last one that was; `None` to hold it back.
    pub fn pass(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if self.second.swap(now, Ordering::Relaxed) == now {
            self.held.fetch_add(1, Ordering::Relaxed);
            None
        } else {
            Some(self.held.swap(0, Ordering::Relaxed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_a_second_passes_with_the_count_held_back() {
        let throttle = OncePerSecond::new();
        // Within one second (a boundary crossed mid-test lets one more by).
        let passed: Vec<Option<u64>> = (0..1000).map(|_| throttle.pass()).collect();
        assert_eq!(passed[0], Some(0));
        let through = passed.iter().filter(|p| p.is_some()).count();
        assert!(through <= 2, "{through} let through");
        let held: u64 = passed.iter().flatten().sum::<u64>()
            + passed.iter().filter(|p| p.is_none()).count() as u64;
        assert!(held >= 998, "{held}");
    }
}
