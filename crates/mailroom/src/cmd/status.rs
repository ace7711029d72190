//! `mailroom status JOB_ID`: what became of a job (no body; recipients masked).

use std::time::Duration;

use anyhow::Context as _;
use mailroom_core::job::JobId;
use mailroom_core::settings::Settings;
use mailroom_core::status::{JobStatus, StatusStore};
use mailroom_core::store::RedisStore;
use time::format_description::well_known::Rfc3339;

use super::shown;

/// Longest part of a refused job id that an error quotes.
const SHOWN_CHARS: usize = 40;

/// Prints the status of `id`.
pub async fn run(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let id = parse_job_id(id)?;
    let store = RedisStore::connect_once(&settings.redis).await?;
    let status = StatusStore::new(store, settings.worker.status_retention)
        .get(&id)
        .await?
        .with_context(|| missing(&id, settings.worker.status_retention))?;
    print!("{}", render(&status));
    Ok(())
}

/// `text` as a job id; the error quotes no more than its start.
pub fn parse_job_id(text: &str) -> anyhow::Result<JobId> {
    text.parse().with_context(|| {
        let mut shown: String = text.chars().take(SHOWN_CHARS).collect();
        if shown.len() < text.len() {
            shown.push('…');
        }
        format!("{shown:?} is not a job id (a UUID)")
    })
}

/// Why a job may have no status. A worker writes the first one (or the
/// API, on acceptance) and can write none for a job whose seal does not
/// open: that job is only in the dead-letter queue, reason `seal`.
fn missing(id: &JobId, retention: Duration) -> String {
    format!(
        "no status for job {id}: not picked up by a worker yet, dead-lettered before it could be \
         opened (reason seal: see `mailroom dlq list`), or older than worker.status_retention ({})",
        span(retention)
    )
}

/// `7 days`, `36 hours`, or humantime's `1h 30m` for the rest.
fn span(duration: Duration) -> String {
    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;
    let secs = duration.as_secs();
    let whole = |unit| duration.subsec_nanos() == 0 && secs > 0 && secs.is_multiple_of(unit);
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if whole(DAY) {
        plural(secs / DAY, "day")
    } else if whole(HOUR) {
        plural(secs / HOUR, "hour")
    } else {
        humantime::format_duration(duration).to_string()
    }
}

fn render(status: &JobStatus) -> String {
    let time = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    let mut out = format!(
        "job        {}\ntenant     {}\nstate      {}\nattempts   {}\nrecipients {}\ncreated    {}\nupdated    {}\n",
        status.job_id,
        shown(&status.tenant, 64),
        status.state,
        status.attempts,
        shown(&status.recipients.join(", "), 1000),
        time(status.created_at),
        time(status.updated_at),
    );
    if let Some(reason) = &status.reason {
        out.push_str(&format!("reason     {}\n", shown(reason, 32)));
    }
    if let Some(error) = &status.last_error {
        // A relay's words: they may hold anything.
        out.push_str(&format!("last error {}\n", shown(error, 1000)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_refused_id_is_quoted_short() {
        let long = "x".repeat(100_000);
        let err = parse_job_id(&long).expect_err("not a UUID").to_string();
        assert_eq!(
            err,
            format!("\"{}…\" is not a job id (a UUID)", "x".repeat(40))
        );
        let err = parse_job_id("nope").expect_err("not a UUID").to_string();
        assert_eq!(err, "\"nope\" is not a job id (a UUID)");
        let id = JobId::new();
        assert_eq!(parse_job_id(&id.to_string()).expect("a UUID"), id);
    }

    #[test]
    fn a_missing_status_names_the_seal_and_the_retention() {
        let text = missing(&JobId::new(), Duration::from_hours(7 * 24));
        assert!(text.contains("reason seal"), "{text}");
        assert!(text.ends_with("(7 days)"), "{text}");
        assert_eq!(span(Duration::from_hours(24)), "1 day");
        assert_eq!(span(Duration::from_hours(36)), "36 hours");
        assert_eq!(span(Duration::from_secs(90)), "1m 30s");
    }
}
