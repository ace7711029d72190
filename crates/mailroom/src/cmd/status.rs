//! `mailroom status JOB_ID`: what became of a job (no body; recipients masked).

use anyhow::Context as _;
use mailroom_core::job::JobId;
use mailroom_core::settings::Settings;
use mailroom_core::status::{JobStatus, StatusStore};
use mailroom_core::store::RedisStore;
use time::format_description::well_known::Rfc3339;

/// Prints the status of `id`.
pub async fn run(settings: &Settings, id: &str) -> anyhow::Result<()> {
    let id: JobId = id
        .parse()
        .with_context(|| format!("{id:?} is not a job id (a UUID)"))?;
    let store = RedisStore::connect(&settings.redis).await?;
    let status = StatusStore::new(store, settings.worker.status_retention)
        .get(&id)
        .await?
        .with_context(|| {
            format!(
                "no status for job {id}: not picked up by a worker yet, or older than worker.status_retention ({})",
                humantime::format_duration(settings.worker.status_retention)
            )
        })?;
    print!("{}", render(&status));
    Ok(())
}

fn render(status: &JobStatus) -> String {
    let time = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    let mut out = format!(
        "job        {}\ntenant     {}\nstate      {}\nattempts   {}\nrecipients {}\ncreated    {}\nupdated    {}\n",
        status.job_id,
        status.tenant,
        status.state,
        status.attempts,
        status.recipients.join(", "),
        time(status.created_at),
        time(status.updated_at),
    );
    if let Some(reason) = &status.reason {
        out.push_str(&format!("reason     {reason}\n"));
    }
    if let Some(error) = &status.last_error {
        out.push_str(&format!("last error {error}\n"));
    }
    out
}
