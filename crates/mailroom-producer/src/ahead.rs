//! Publishing a run of jobs through a window of unconfirmed ones, sealed a
//! few ahead of it.
//!
//! Confirms come in groups, and lapin's I/O thread has just read them when
//! the window opens. Jobs already sealed are published then, back to back,
//! while that thread is still awake to write them; their successors are
//! sealed afterwards, while it writes. Sealing the successors first (what
//! a `buffered` stream of seal-then-publish does) left the I/O thread idle
//! for a group's sealing, asleep by the time the first publish came, and
//! woken with a futex call and a context switch on both sides: about 1 µs
//! of client CPU a job in `bench enqueue` (README, producer section).

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::task::Poll;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;

/// Jobs sealed ahead of the window at most.
const AHEAD: usize = 32;

/// Bytes of sealed jobs held ahead at most: a large job is sealed ahead
/// alone, so sealing ahead adds at most one job's size to what the window
/// holds.
const AHEAD_BYTES: usize = 256 * 1024;

/// Seals each of `items` with `seal` (which also gives its size in bytes)
/// and publishes it with `publish`, with at most `window` publishes
/// unfinished; their outputs in the items' order.
pub async fn seal_ahead<T, S, F>(
    items: impl IntoIterator<Item = T>,
    window: usize,
    mut seal: impl FnMut(T) -> (S, usize),
    mut publish: impl FnMut(S) -> F,
) -> Vec<F::Output>
where
    F: Future,
{
    let window = window.max(1);
    let mut items = items.into_iter();
    let mut ahead: VecDeque<(S, usize)> = VecDeque::new();
    let mut ahead_bytes = 0;
    let mut in_flight = FuturesOrdered::new();
    let mut outputs = Vec::with_capacity(items.size_hint().0);
    poll_fn(|cx| {
        // Seals in this call: a run of publishes that finish at once (a
        // broker refusing every one) must not keep the thread forever.
        let mut sealed = 0;
        loop {
            while in_flight.len() < window {
                let Some((job, bytes)) = ahead.pop_front() else {
                    break;
                };
                ahead_bytes -= bytes;
                in_flight.push_back(publish(job));
            }
            // Polls the new publishes too, so they are handed to lapin
            // before anything is sealed.
            while let Poll::Ready(Some(output)) = in_flight.poll_next_unpin(cx) {
                outputs.push(output);
            }
            while ahead.len() < AHEAD && ahead_bytes < AHEAD_BYTES {
                let Some(item) = items.next() else { break };
                let (job, bytes) = seal(item);
                ahead_bytes += bytes;
                ahead.push_back((job, bytes));
                sealed += 1;
            }
            if ahead.is_empty() && in_flight.is_empty() {
                return Poll::Ready(());
            }
            if ahead.is_empty() || in_flight.len() >= window {
                // `in_flight` is not empty, and its last poll registered
                // the waker.
                return Poll::Pending;
            }
            if sealed >= window {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    })
    .await;
    outputs
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_output_comes_in_the_items_order() {
        // Later items finish first: the order must still be the items'.
        let outputs = seal_ahead(
            0..500u64,
            7,
            |n| (n, 10),
            |n| async move {
                tokio::time::sleep(Duration::from_micros(500 - n)).await;
                n * 2
            },
        )
        .await;
        assert_eq!(outputs, (0..500).map(|n| n * 2).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn no_more_than_the_window_is_unfinished_and_the_rest_waits_sealed_ahead() {
        let unfinished = Rc::new(Cell::new(0usize));
        let most = Rc::new(Cell::new(0usize));
        let sealed = Rc::new(Cell::new(0usize));
        let published = Rc::new(Cell::new(0usize));
        let most_ahead = Rc::new(Cell::new(0usize));
        let outputs = seal_ahead(
            0..300,
            16,
            |n| {
                sealed.set(sealed.get() + 1);
                most_ahead.set(most_ahead.get().max(sealed.get() - published.get()));
                (n, 100)
            },
            |n| {
                published.set(published.get() + 1);
                let (unfinished, most) = (Rc::clone(&unfinished), Rc::clone(&most));
                unfinished.set(unfinished.get() + 1);
                most.set(most.get().max(unfinished.get()));
                async move {
                    tokio::task::yield_now().await;
                    unfinished.set(unfinished.get() - 1);
                    n
                }
            },
        )
        .await;
        assert_eq!(outputs.len(), 300);
        assert_eq!(most.get(), 16);
        assert_eq!(most_ahead.get(), AHEAD);
    }

    #[tokio::test]
    async fn large_jobs_are_sealed_ahead_one_at_a_time() {
        let sealed = Cell::new(0usize);
        let published = Cell::new(0usize);
        let most_ahead = Cell::new(0usize);
        seal_ahead(
            0..20,
            4,
            |n| {
                sealed.set(sealed.get() + 1);
                most_ahead.set(most_ahead.get().max(sealed.get() - published.get()));
                (n, AHEAD_BYTES)
            },
            |n| {
                published.set(published.get() + 1);
                async move {
                    tokio::task::yield_now().await;
                    n
                }
            },
        )
        .await;
        assert_eq!(most_ahead.get(), 1);
    }

    #[tokio::test]
    async fn publishes_that_finish_at_once_let_other_tasks_run() {
        let ticks = Rc::new(Cell::new(0usize));
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let counter = Rc::clone(&ticks);
                let ticker = tokio::task::spawn_local(async move {
                    loop {
                        counter.set(counter.get() + 1);
                        tokio::task::yield_now().await;
                    }
                });
                seal_ahead(0..100_000, 8, |n| (n, 1), |n| async move { n }).await;
                ticker.abort();
            })
            .await;
        assert!(ticks.get() > 1, "the other task never ran");
    }
}
