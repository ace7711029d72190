//! CPU-heavy steps on large messages, kept off the async threads' queues.
//!
//! Opening, validating, building or sealing a 10 MiB message takes tens to
//! hundreds of milliseconds. Run inline on a runtime thread, that holds up
//! every task queued behind it on that thread: other deliveries, SMTP
//! replies, batched acks, `/healthz`. [`heavy`] hands the thread's other
//! tasks to another thread first (`block_in_place`), which needs no
//! `'static` copy of the message, unlike `spawn_blocking`.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Messages up to this size are worked inline: a step on them takes
/// microseconds, less than handing the thread's tasks over would cost.
pub const INLINE_MAX: usize = 64 * 1024;

/// Runs `work` on a message of `bytes` bytes: inline when it is small or
/// when there is no multi-thread runtime to hand the other tasks to (a
/// current-thread runtime, or no runtime at all), else in
/// `block_in_place`.
pub fn heavy<T>(bytes: usize, work: impl FnOnce() -> T) -> T {
    if bytes > INLINE_MAX
        && Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread)
    {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    /// A runtime with one worker thread: a task spawned on it can only run
    /// while the step runs if the step gave the thread up.
    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Whether a task spawned just before a step of `bytes` ran while the
    /// step worked (the step waits up to 2 s for it).
    fn other_task_ran_during_step(runtime: &tokio::runtime::Runtime, bytes: usize) -> bool {
        runtime.block_on(async {
            tokio::spawn(async move {
                let ran = Arc::new(AtomicBool::new(false));
                let flag = Arc::clone(&ran);
                // Spawned from a worker thread, it waits in that thread's
                // local queue, which only a hand-over frees.
                let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
                let seen = heavy(bytes, || {
                    let deadline = std::time::Instant::now() + Duration::from_secs(2);
                    while std::time::Instant::now() < deadline {
                        if ran.load(Ordering::SeqCst) {
                            return true;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    false
                });
                other.await.expect("other task");
                seen
            })
            .await
            .expect("step task")
        })
    }

    #[test]
    fn a_large_step_lets_other_tasks_run() {
        assert!(other_task_ran_during_step(&one_worker(), INLINE_MAX + 1));
    }

    #[test]
    fn a_small_step_runs_inline() {
        assert!(!other_task_ran_during_step(&one_worker(), INLINE_MAX));
    }

    #[test]
    fn a_current_thread_runtime_runs_the_step_inline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let thread = std::thread::current().id();
        let ran_on =
            runtime.block_on(async { heavy(INLINE_MAX * 4, || std::thread::current().id()) });
        assert_eq!(ran_on, thread);
    }

    #[test]
    fn outside_a_runtime_the_step_runs_inline() {
        assert_eq!(heavy(INLINE_MAX * 4, || 7), 7);
    }
}
