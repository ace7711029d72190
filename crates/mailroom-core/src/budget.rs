//! A budget of bytes that large messages take a share of while they are
//! worked, so a burst of them is handled a few at a time instead of all at
//! once. Counted in KiB; a share larger than the whole budget takes all of
//! it (that message runs alone rather than never).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes that may be in work at once.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    kib: Arc<Semaphore>,
    total: u32,
}

/// A share of a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct Share {
    _permit: OwnedSemaphorePermit,
}

impl ByteBudget {
    /// A budget of `bytes` (at least 1 KiB, at most 4 TiB).
    pub fn new(bytes: usize) -> Self {
        let total = u32::try_from(kib(bytes)).unwrap_or(u32::MAX);
        Self {
            kib: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until `bytes` fit (all of the budget if they exceed it).
    pub async fn reserve(&self, bytes: usize) -> Share {
        let share = u32::try_from(kib(bytes)).map_or(self.total, |n| n.min(self.total));
        match Arc::clone(&self.kib).acquire_many_owned(share).await {
            Ok(permit) => Share { _permit: permit },
            Err(_) => unreachable!("a byte budget's semaphore is never closed"),
        }
    }
}

/// `bytes` in whole KiB, at least one.
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_share_is_at_least_a_kib() {
        assert_eq!(kib(0), 1);
        assert_eq!(kib(2_400), 3);
        assert_eq!(kib(1024), 1);
    }

    #[tokio::test]
    async fn a_share_waits_for_room_and_an_oversized_one_runs_alone() {
        let budget = ByteBudget::new(10 * 1024);
        let big = budget.reserve(8 * 1024).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), budget.reserve(4 * 1024));
        assert!(waiting.await.is_err(), "4 KiB do not fit beside 8 of 10");
        drop(big);
        let oversized = budget.reserve(1 << 30).await;
        let beside = tokio::time::timeout(Duration::from_millis(50), budget.reserve(1));
        assert!(beside.await.is_err(), "an oversized share takes it all");
        drop(oversized);
        let _small = budget.reserve(1).await;
    }
}
