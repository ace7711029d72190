//! A budget of bytes that large messages take a share of while they are
//! worked, so a burst of them is handled a few at a time instead of all at
//! once. Counted in KiB; a share larger than the whole budget takes all of
//! it (that message runs alone rather than never).
//!
//! [`FairBudget`] adds a cap per party (the API's tenants), so one that
//! declares large bodies and sends them slowly holds at most half of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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

/// A [`ByteBudget`] of which one party holds at most half (or one
/// message's worth when that is more: `floor`), so the other half stays
/// for everyone else.
#[derive(Clone, Debug)]
pub struct FairBudget {
    whole: ByteBudget,
    party_bytes: usize,
    parties: Arc<Mutex<HashMap<String, ByteBudget>>>,
}

/// A share of a [`FairBudget`], given back (the party's and the whole's)
/// when dropped.
#[derive(Debug)]
pub struct FairShare {
    whole: Option<Share>,
    party: Option<Share>,
    name: String,
    parties: Arc<Mutex<HashMap<String, ByteBudget>>>,
}

impl FairBudget {
    /// A budget of `bytes` of which one party holds at most half, or
    /// `floor` if that is more.
    pub fn new(bytes: usize, floor: usize) -> Self {
        Self {
            whole: ByteBudget::new(bytes),
            party_bytes: (bytes / 2).max(floor).min(bytes),
            parties: Arc::default(),
        }
    }

    /// Waits until `bytes` fit within `party`'s cap, then within the
    /// whole budget. A party waits behind its own shares first, so its
    /// queue takes nothing from others while it waits.
    pub async fn reserve(&self, party: &str, bytes: usize) -> FairShare {
        // Declared before `own`, so a reservation cancelled while it waits
        // drops `own` first and leaves no stale entry in the map.
        let mut share = FairShare {
            whole: None,
            party: None,
            name: party.to_owned(),
            parties: Arc::clone(&self.parties),
        };
        let own = self
            .parties
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(party.to_owned())
            .or_insert_with(|| ByteBudget::new(self.party_bytes))
            .clone();
        share.party = Some(own.reserve(bytes).await);
        drop(own);
        share.whole = Some(self.whole.reserve(bytes).await);
        share
    }
}

#[cfg(test)]
impl FairBudget {
    fn is_idle(&self) -> bool {
        self.parties.lock().is_ok_and(|parties| parties.is_empty())
    }
}

impl Drop for FairShare {
    fn drop(&mut self) {
        self.whole.take();
        self.party.take();
        let mut parties = self.parties.lock().unwrap_or_else(PoisonError::into_inner);
        // Forgotten once nobody holds or waits for a share of it.
        if parties
            .get(&self.name)
            .is_some_and(|own| Arc::strong_count(&own.kib) == 1)
        {
            parties.remove(&self.name);
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

    #[tokio::test]
    async fn one_party_holds_at_most_half_and_is_forgotten_when_done() {
        let budget = FairBudget::new(64 * 1024, 16 * 1024);
        let first = budget.reserve("a", 16 * 1024).await;
        let second = budget.reserve("a", 16 * 1024).await;
        let third = tokio::time::timeout(Duration::from_millis(50), budget.reserve("a", 1024));
        assert!(third.await.is_err(), "a third share is over a's half");
        let other = tokio::time::timeout(Duration::from_millis(50), budget.reserve("b", 32 * 1024));
        let other = other.await.expect("b takes the other half");
        drop((first, second, other));
        assert!(budget.is_idle(), "no entry kept");
    }

    #[tokio::test]
    async fn the_floor_lets_one_message_through_and_never_exceeds_the_whole() {
        assert_eq!(FairBudget::new(10 * 1024, 16 * 1024).party_bytes, 10 * 1024);
        assert_eq!(FairBudget::new(64 * 1024, 48 * 1024).party_bytes, 48 * 1024);
        let budget = FairBudget::new(64 * 1024, 0);
        let held = budget.reserve("a", 32 * 1024).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(20), budget.reserve("a", 1));
        assert!(cancelled.await.is_err());
        drop(held);
        assert!(budget.is_idle(), "the cancelled wait left nothing");
    }
}
