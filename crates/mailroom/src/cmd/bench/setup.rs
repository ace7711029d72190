//! What every benchmark sets up the same way: its own vhost, sample jobs,
//! and empty queues.

use anyhow::Context as _;
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, QueuePurgeOptions};
use mailroom_core::amqp::Broker;
use mailroom_core::job::{EmailMessage, JobRequest, Lane, SendJob};
use mailroom_core::settings::{Secret, Settings};
use mailroom_core::store::RedisStore;
use mailroom_core::wire::{Topology, work_queue};
use mailroom_producer::Producer;

/// `settings` pointed at `vhost`, connected, with the topology declared.
/// Returns the settings, the vhost's URL and the broker.
pub async fn bench_broker(
    settings: &Settings,
    vhost: &str,
) -> anyhow::Result<(Settings, String, Broker)> {
    let mut settings = settings.clone();
    let url = settings
        .amqp
        .urls
        .first()
        .context("amqp.urls is empty")?
        .expose()
        .to_owned();
    let url = with_vhost(&url, vhost);
    settings.amqp.urls = vec![Secret::new(url.clone())];
    let broker = Broker::connect(&settings.amqp).await.with_context(|| {
        format!(
            "connecting to vhost {vhost:?}; create it with: rabbitmqctl add_vhost {vhost} && rabbitmqctl set_permissions -p {vhost} guest '.*' '.*' '.*'"
        )
    })?;
    broker.declare(&Topology::standard()).await?;
    purge_queues(&broker).await?;
    Ok((settings, url, broker))
}

/// `url` with its vhost replaced.
pub fn with_vhost(url: &str, vhost: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let query = rest.find('?').map_or("", |at| &rest[at..]);
    let encoded: String = vhost
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{scheme}://{authority}/{encoded}{query}")
}

pub fn body_text(size: usize) -> String {
    const WORDS: &str = "the quick brown fox jumps over the lazy dog; ";
    WORDS.chars().cycle().take(size).collect()
}

pub fn job(body: &str) -> SendJob {
    SendJob::from_request(
        JobRequest {
            lane: Lane::Transactional,
            message: EmailMessage {
                from: "Bench <bench@mailroom.example>".to_owned(),
                to: vec!["Reader <reader@example.org>".to_owned()],
                subject: "mailroom bench".to_owned(),
                text: Some(body.to_owned()),
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        },
        "bench",
    )
}

/// Empties every queue of mailroom's topology in the bench's vhost: the
/// work queues, and the retry tiers and dead letters too, so that nothing
/// of an earlier run (one that failed with jobs waiting to be retried, say)
/// comes back into this one.
pub async fn purge_queues(broker: &Broker) -> anyhow::Result<()> {
    let channel = broker.channel().await?;
    for queue in Topology::standard().queues {
        channel
            .queue_purge(queue.name.as_str().into(), QueuePurgeOptions::default())
            .await?;
    }
    let _ = channel.close(200, "bench done".into()).await;
    Ok(())
}

/// Deletes this run's keys.
pub async fn clean_up(store: &RedisStore, prefix: &str) {
    let mut connection = store.connection();
    let mut cursor: u64 = 0;
    loop {
        let scanned: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await;
        let Ok((next, keys)) = scanned else { return };
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut connection)
                .await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// The properties and headers mailroom gives a job: one job enqueued and
/// fetched back.
pub async fn sample_properties(producer: &Producer, body: &str) -> anyhow::Result<BasicProperties> {
    producer.enqueue(job(body)).await?;
    let channel = producer.broker().channel().await?;
    let message = channel
        .basic_get(
            work_queue(Lane::Transactional).as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await?
        .context("the sample job did not arrive")?;
    let _ = channel.close(200, "sampled".into()).await;
    Ok(message.delivery.properties.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_replaced_and_encoded() {
        assert_eq!(
            with_vhost("amqp://guest:guest@127.0.0.1:5672/%2f", "mailroom-bench"),
            "amqp://guest:guest@127.0.0.1:5672/mailroom-bench"
        );
        assert_eq!(with_vhost("amqps://h", "a b"), "amqps://h/a%20b");
        assert_eq!(
            with_vhost("amqp://h:1/x?heartbeat=5", "v"),
            "amqp://h:1/v?heartbeat=5"
        );
    }
}
