//! `queued` statuses for the jobs `send` enqueued, as the API writes them,
//! so `mailroom status ID` answers at once. Informative only: without
//! Redis the jobs are enqueued all the same, and `send` says so once.

use mailroom_core::settings::Settings;
use mailroom_core::status::{StatusStore, StatusUpdate};
use mailroom_core::store::RedisStore;

/// Where the statuses go, while Redis takes them.
pub struct Queued(Option<StatusStore>);

impl Queued {
    /// Connects once; without Redis, writes nothing.
    pub async fn connect(settings: &Settings) -> Self {
        match RedisStore::connect_once(&settings.redis).await {
            Ok(store) => Self(Some(StatusStore::new(
                store,
                settings.worker.status_retention,
            ))),
            Err(err) => {
                unwritten(&err);
                Self(None)
            }
        }
    }

    /// Records `updates` in one round trip; a worker that was quicker is
    /// never overwritten.
    pub async fn record(&mut self, updates: &[StatusUpdate]) {
        let Some(statuses) = self.0.as_ref().filter(|_| !updates.is_empty()) else {
            return;
        };
        if let Err(err) = statuses.record_queued_all(updates).await {
            unwritten(&err);
            self.0 = None;
        }
    }
}

fn unwritten(err: &dyn std::fmt::Display) {
    eprintln!(
        "mailroom: `queued` statuses not written ({err}); the jobs are enqueued all the same"
    );
}
