//! Log lines gathered in memory and written out in batches by a thread of
//! their own, at most [`GATHER`] after the first line of a batch.
//!
//! A channel to a writer thread (tracing-appender's) wakes that thread for
//! nearly every line when lines come one per request: a futex call on the
//! caller's side, a context switch and a `write(2)` on the writer's. Here a
//! line costs its caller a lock and a copy; only the first line of a batch
//! wakes the writer, which then waits [`GATHER`] for more before writing.
//! A line is never dropped: past [`CAP`] bytes the caller writes the batch
//! out itself.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first of a batch.
pub const GATHER: Duration = Duration::from_millis(10);

/// Bytes past which a caller writes the batch out itself rather than let
/// it grow (the writer may be stuck on a full pipe).
const CAP: usize = 1 << 20;

/// Where the batches go.
type Sink = Box<dyn Write + Send>;

struct Shared {
    /// Lines not yet handed to the sink, and whether to stop.
    pending: Mutex<Pending>,
    /// Signalled when a batch starts and on stop.
    started: Condvar,
    /// Held while a batch is taken and written, so batches leave in order.
    sink: Mutex<Sink>,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    stop: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves bytes, not a broken invariant.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Takes what is pending and writes it, in the order batches were taken.
    fn write_out(&self) {
        let mut sink = lock(&self.sink);
        let lines = std::mem::take(&mut lock(&self.pending).lines);
        if !lines.is_empty() {
            // Nowhere left to report a failing stderr.
            let _ = sink.write_all(&lines).and_then(|()| sink.flush());
        }
    }
}

/// The `MakeWriter` the log layer writes through: cheap to clone.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread once everything pending is written, when dropped.
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for BatchGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchGuard").finish_non_exhaustive()
    }
}

/// A writer batching into `sink`, and the guard of its thread.
///
/// # Errors
/// When the thread cannot be started.
pub fn batched(sink: Sink, name: &str) -> std::io::Result<(BatchedWriter, BatchGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        started: Condvar::new(),
        sink: Mutex::new(sink),
    });
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&shared))?
    };
    Ok((
        BatchedWriter {
            shared: Arc::clone(&shared),
        },
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared) {
    loop {
        let stop = {
            let pending = lock(&shared.pending);
            let pending = shared
                .started
                .wait_while(pending, |p| p.lines.is_empty() && !p.stop)
                .unwrap_or_else(PoisonError::into_inner);
            pending.stop
        };
        if !stop {
            std::thread::sleep(GATHER);
        }
        shared.write_out();
        if stop {
            return;
        }
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).stop = true;
        self.shared.started.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines logged while the thread was stopping.
        self.shared.write_out();
    }
}

/// One event's line (the log layer writes each event whole, once).
pub struct Line<'a> {
    shared: &'a Shared,
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = {
            let mut pending = lock(&self.shared.pending);
            let first = pending.lines.is_empty();
            pending.lines.extend_from_slice(bytes);
            if first {
                self.shared.started.notify_one();
            }
            pending.lines.len() >= CAP
        };
        if full {
            self.shared.write_out();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A sink that records each write.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).push(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).concat()).expect("utf-8")
        }
    }

    fn log(writer: &BatchedWriter, line: &str) {
        writer
            .make_writer()
            .write_all(line.as_bytes())
            .expect("written");
    }

    #[test]
    fn lines_from_many_threads_leave_whole_in_few_writes() {
        let sink = Recorder::default();
        let (writer, guard) = batched(Box::new(sink.clone()), "test-log").expect("thread");
        std::thread::scope(|scope| {
            for t in 0..4 {
                let writer = writer.clone();
                scope.spawn(move || {
                    for i in 0..1000 {
                        log(&writer, &format!("thread {t} line {i}\n"));
                    }
                });
            }
        });
        drop(guard);
        let text = sink.text();
        assert_eq!(text.lines().count(), 4000, "every line, none cut");
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|line| line.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "each thread's lines in its order");
        }
        assert!(
            lock(&sink.0).len() < 4000,
            "lines are gathered, not written one by one"
        );
    }

    #[test]
    fn a_lone_line_is_written_soon_without_a_drop() {
        let sink = Recorder::default();
        let (writer, _guard) = batched(Box::new(sink.clone()), "test-log").expect("thread");
        log(&writer, "alone\n");
        let started = Instant::now();
        while sink.text().is_empty() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.text(), "alone\n");
    }

    #[test]
    fn past_the_cap_the_caller_writes_the_batch_itself() {
        let sink = Recorder::default();
        let (writer, guard) = batched(Box::new(sink.clone()), "test-log").expect("thread");
        let big = "x".repeat(CAP);
        log(&writer, &big);
        // Written by this thread, before the writer's gathering time is up.
        assert_eq!(sink.text().len(), CAP);
        drop(guard);
    }
}
