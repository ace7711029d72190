//! Log lines captured from the code under test, for tests that check what
//! the logs say (and what they must never say).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, Once, PoisonError};

use serde_json::Value;

/// Log lines written while a guard from [`Captured::install`] lives.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

thread_local! {
    // Where this thread's log lines go while a capture's guard lives.
    static CURRENT: RefCell<Option<Captured>> = const { RefCell::new(None) };
}

/// Writes to this thread's capture, if any.
struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CURRENT.with(|current| match current.borrow_mut().as_mut() {
            Some(captured) => captured.write(buf),
            None => Ok(buf.len()),
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Ends a capture when dropped.
pub struct CaptureGuard {
    previous: Option<Captured>,
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
    }
}

impl Captured {
    /// Captures this thread's logs, as JSON lines, until the guard is
    /// dropped (an in-process API on a current-thread runtime runs its
    /// tasks on it). One process-wide subscriber writes every thread's
    /// lines to that thread's capture: a subscriber set for one thread
    /// only lost events now and then, when another test's thread
    /// registered the same call sites at the same moment (tracing caches
    /// whether a call site is wanted process-wide).
    pub fn install(&self) -> CaptureGuard {
        static GLOBAL: Once = Once::new();
        GLOBAL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .json()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(|| ThreadWriter)
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in a test that captures logs");
        });
        let previous = CURRENT.with(|current| current.replace(Some(self.clone())));
        CaptureGuard { previous }
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// The access-log lines so far, their fields parsed.
    pub fn access_lines(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["target"] == "mailroom::access")
            .map(|line| line["fields"].clone())
            .collect()
    }
}
