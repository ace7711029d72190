//! The wire contract on RabbitMQ, as data: exchange and queue names, header
//! names, queue arguments, and the choice of retry tier for a delay.
//!
//! Declaring it on a broker is the AMQP plumbing's job; this module only says
//! what exists, so producer, worker and `mailroom topology` agree by
//! construction.
//!
//! Retries travel through `mailroom.retry` with the tier as routing key and
//! the job's lane in the `CC` header. The tier queues dead-letter to
//! `mailroom.jobs` with the message's own routing keys, which include the
//! `CC` ones, so the lane key brings the job back to its work queue: one set
//! of tier queues serves every lane.
//!
//! Each lane has two work queues: one for jobs up to [`LARGE_JOB_BYTES`]
//! sealed, one for larger ones. RabbitMQ bounds a consumer's prefetch only
//! by number, so a worker consumes the large-job queue with a small
//! prefetch (`worker.large_prefetch`): a backlog of 10 MiB attachments
//! cannot fill its memory with `worker.prefetch` of them. Every publisher
//! (producer, retry, `dlq replay`) picks the queue by the body's size
//! ([`WorkQueue::of`]), and the retry `CC` header carries that queue's
//! routing key, so a large job stays in the large-job queue of its lane.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use crate::job::Lane;

/// Direct exchange for work; routing key = lane.
pub const JOBS_EXCHANGE: &str = "mailroom.jobs";
/// Direct exchange for delayed retries; routing key = tier name.
pub const RETRY_EXCHANGE: &str = "mailroom.retry";
/// Quorum queue of dead letters (published through the default exchange).
pub const DEAD_QUEUE: &str = "mailroom.dead";
/// Content type of a sealed job.
pub const CONTENT_TYPE: &str = "application/vnd.mailroom.sealed";

/// AMQP delivery mode of a message written to disk: every job and every
/// republish of one.
pub const PERSISTENT: u8 = 2;

/// Sealed jobs larger than this go to their lane's large-job queue. A
/// 2 KiB message seals to ~2.4 KB; one with a 200 KiB attachment to
/// ~280 KB.
pub const LARGE_JOB_BYTES: usize = 256 * 1024;

/// Redeliveries of one message before the broker dead-letters it: the
/// backstop against a message that kills every worker that takes it.
pub const DELIVERY_LIMIT: i64 = 5;

/// Header names carried by every job message.
pub mod headers {
    /// Id of the key that sealed the body.
    pub const KID: &str = "mailroom-kid";
    /// Delivery attempt, 1 for the first.
    pub const ATTEMPT: &str = "mailroom-attempt";
    /// Sending tenant (also bound into the seal).
    pub const TENANT: &str = "mailroom-tenant";
    /// Lane name.
    pub const LANE: &str = "mailroom-lane";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// Why a job was dead-lettered (`seal`, `invalid`, `expired`, `rejected`, ...).
    pub const REASON: &str = "mailroom-reason";
    /// The last error, redacted.
    pub const LAST_ERROR: &str = "mailroom-last-error";
    /// When a message was dead-lettered (RFC 3339), for `dlq list`'s age.
    pub const DEAD_AT: &str = "mailroom-dead-at";
    /// Set (`true`) by `dlq replay`: an operator chose to send a job whose
    /// earlier outcome was uncertain.
    pub const REPLAYED: &str = "mailroom-replayed";
    /// Sender-selected extra routing keys (RabbitMQ's `CC`); carries the lane
    /// through the retry tiers.
    pub const CC: &str = "CC";
}

/// A delay tier: a queue whose messages wait `ttl` and then return to work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryTier {
    /// Tier name, the routing key on [`RETRY_EXCHANGE`].
    pub name: &'static str,
    /// How long a message waits in it.
    pub ttl: Duration,
}

impl RetryTier {
    /// The tier's queue name, e.g. `mailroom.retry.30s`.
    pub fn queue(&self) -> String {
        format!("{RETRY_EXCHANGE}.{}", self.name)
    }
}

/// Every retry tier, shortest first.
pub const RETRY_TIERS: [RetryTier; 6] = [
    RetryTier {
        name: "1s",
        ttl: Duration::from_secs(1),
    },
    RetryTier {
        name: "5s",
        ttl: Duration::from_secs(5),
    },
    RetryTier {
        name: "30s",
        ttl: Duration::from_secs(30),
    },
    RetryTier {
        name: "2m",
        ttl: Duration::from_mins(2),
    },
    RetryTier {
        name: "10m",
        ttl: Duration::from_mins(10),
    },
    RetryTier {
        name: "1h",
        ttl: Duration::from_hours(1),
    },
];

/// The tier for a wanted delay: the shortest one at least as long, or the
/// longest when the delay exceeds them all. Never shorter than asked unless
/// nothing is longer, so backoff is not undercut.
pub fn tier_for(delay: Duration) -> &'static RetryTier {
    RETRY_TIERS
        .iter()
        .find(|tier| tier.ttl >= delay)
        .unwrap_or(&RETRY_TIERS[RETRY_TIERS.len() - 1])
}

/// The work queue of a lane's jobs up to [`LARGE_JOB_BYTES`], e.g.
/// `mailroom.send.bulk`.
pub fn work_queue(lane: Lane) -> String {
    WorkQueue { lane, large: false }.name()
}

/// A work queue: a lane's queue for jobs up to [`LARGE_JOB_BYTES`] sealed,
/// or its queue for larger ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkQueue {
    /// The lane.
    pub lane: Lane,
    /// Whether it holds jobs over [`LARGE_JOB_BYTES`].
    pub large: bool,
}

impl WorkQueue {
    /// Every work queue, transactional first.
    pub const ALL: [Self; 4] = [
        Self {
            lane: Lane::Transactional,
            large: false,
        },
        Self {
            lane: Lane::Bulk,
            large: false,
        },
        Self {
            lane: Lane::Transactional,
            large: true,
        },
        Self {
            lane: Lane::Bulk,
            large: true,
        },
    ];

    /// The queue of a job of `lane` whose sealed body is `sealed_bytes`.
    pub fn of(lane: Lane, sealed_bytes: usize) -> Self {
        Self {
            lane,
            large: sealed_bytes > LARGE_JOB_BYTES,
        }
    }

    /// Its routing key on [`JOBS_EXCHANGE`]: the lane, `.large` added for
    /// the large-job queue.
    pub fn routing_key(self) -> &'static str {
        match (self.lane, self.large) {
            (Lane::Transactional, false) => "transactional",
            (Lane::Bulk, false) => "bulk",
            (Lane::Transactional, true) => "transactional.large",
            (Lane::Bulk, true) => "bulk.large",
        }
    }

    /// Its name, e.g. `mailroom.send.bulk.large`.
    pub fn name(self) -> String {
        format!("mailroom.send.{}", self.routing_key())
    }
}

/// A queue argument's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgValue {
    /// A string argument.
    Str(&'static str),
    /// A number argument (sent as a signed 64-bit `long`, always, so that
    /// redeclaring compares equal).
    Int(i64),
}

/// A queue to declare, with its arguments and binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// `x-` arguments.
    pub arguments: Vec<(&'static str, ArgValue)>,
    /// Exchange and routing key it is bound with, if any.
    pub binding: Option<(&'static str, String)>,
}

impl QueueSpec {
    /// The arguments as an AMQP table for `queue_declare`.
    pub fn argument_table(&self) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in &self.arguments {
            let value = match value {
                ArgValue::Str(s) => AMQPValue::LongString(LongString::from(*s)),
                ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            };
            table.insert(ShortString::from(*key), value);
        }
        table
    }
}

/// Everything mailroom declares on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Direct exchanges, durable.
    pub exchanges: Vec<&'static str>,
    /// Queues, durable, in declaration order.
    pub queues: Vec<QueueSpec>,
}

/// Arguments every queue that dead-letters carries: the default strategy is
/// at-most-once and can drop a message in flight; at-least-once needs
/// `reject-publish` overflow.
fn dead_lettering(exchange: &'static str) -> Vec<(&'static str, ArgValue)> {
    vec![
        ("x-queue-type", ArgValue::Str("quorum")),
        ("x-dead-letter-exchange", ArgValue::Str(exchange)),
        ("x-dead-letter-strategy", ArgValue::Str("at-least-once")),
        ("x-overflow", ArgValue::Str("reject-publish")),
    ]
}

impl Topology {
    /// mailroom's topology.
    pub fn standard() -> Self {
        let mut queues: Vec<QueueSpec> = WorkQueue::ALL
            .iter()
            .map(|queue| {
                let mut arguments = dead_lettering("");
                arguments.push(("x-dead-letter-routing-key", ArgValue::Str(DEAD_QUEUE)));
                arguments.push(("x-delivery-limit", ArgValue::Int(DELIVERY_LIMIT)));
                QueueSpec {
                    name: queue.name(),
                    arguments,
                    binding: Some((JOBS_EXCHANGE, queue.routing_key().to_owned())),
                }
            })
            .collect();
        queues.extend(RETRY_TIERS.iter().map(|tier| {
            let mut arguments = dead_lettering(JOBS_EXCHANGE);
            let ttl_ms = i64::try_from(tier.ttl.as_millis()).unwrap_or(i64::MAX);
            arguments.push(("x-message-ttl", ArgValue::Int(ttl_ms)));
            QueueSpec {
                name: tier.queue(),
                arguments,
                binding: Some((RETRY_EXCHANGE, tier.name.to_owned())),
            }
        }));
        queues.push(QueueSpec {
            name: DEAD_QUEUE.to_owned(),
            arguments: vec![("x-queue-type", ArgValue::Str("quorum"))],
            binding: None,
        });
        Self {
            exchanges: vec![JOBS_EXCHANGE, RETRY_EXCHANGE],
            queues,
        }
    }
}

/// The `CC` header value that brings a retried job back to `queue`.
pub fn retry_cc(queue: WorkQueue) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
        LongString::from(queue.routing_key()),
    )]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_is_the_shortest_not_shorter_than_the_delay() {
        let secs = Duration::from_secs;
        for (delay, tier) in [
            (Duration::ZERO, "1s"),
            (Duration::from_millis(200), "1s"),
            (secs(1), "1s"),
            (Duration::from_millis(1001), "5s"),
            (secs(5), "5s"),
            (secs(6), "30s"),
            (secs(31), "2m"),
            (secs(120), "2m"),
            (secs(121), "10m"),
            (secs(3000), "1h"),
            (secs(3600), "1h"),
            (secs(86_400), "1h"),
        ] {
            assert_eq!(tier_for(delay).name, tier, "delay {delay:?}");
        }
    }

    #[test]
    fn tiers_are_sorted_and_named_after_their_ttl() {
        assert!(RETRY_TIERS.windows(2).all(|w| w[0].ttl < w[1].ttl));
        for tier in RETRY_TIERS {
            let parsed = humantime::parse_duration(tier.name).expect("tier name is a duration");
            assert_eq!(parsed, tier.ttl);
        }
    }

    fn queue(name: &str) -> QueueSpec {
        Topology::standard()
            .queues
            .into_iter()
            .find(|q| q.name == name)
            .unwrap_or_else(|| panic!("no queue {name}"))
    }

    fn arg(spec: &QueueSpec, key: &str) -> Option<ArgValue> {
        spec.arguments
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn every_queue_is_quorum() {
        for spec in Topology::standard().queues {
            assert_eq!(
                arg(&spec, "x-queue-type"),
                Some(ArgValue::Str("quorum")),
                "{}",
                spec.name
            );
        }
    }

    #[test]
    fn work_queues_are_bound_by_lane_and_size_and_dead_letter_safely() {
        for (name, key) in [
            ("mailroom.send.transactional", "transactional"),
            ("mailroom.send.bulk", "bulk"),
            ("mailroom.send.transactional.large", "transactional.large"),
            ("mailroom.send.bulk.large", "bulk.large"),
        ] {
            let spec = queue(name);
            assert_eq!(spec.binding, Some((JOBS_EXCHANGE, key.to_owned())));
            assert_eq!(
                arg(&spec, "x-delivery-limit"),
                Some(ArgValue::Int(DELIVERY_LIMIT))
            );
            assert_eq!(
                arg(&spec, "x-dead-letter-exchange"),
                Some(ArgValue::Str(""))
            );
            assert_eq!(
                arg(&spec, "x-dead-letter-routing-key"),
                Some(ArgValue::Str(DEAD_QUEUE))
            );
            assert_eq!(
                arg(&spec, "x-dead-letter-strategy"),
                Some(ArgValue::Str("at-least-once"))
            );
            assert_eq!(
                arg(&spec, "x-overflow"),
                Some(ArgValue::Str("reject-publish"))
            );
        }
    }

    #[test]
    fn retry_tiers_wait_then_return_to_work_with_their_own_routing_keys() {
        for tier in RETRY_TIERS {
            let spec = queue(&format!("mailroom.retry.{}", tier.name));
            assert_eq!(spec.binding, Some((RETRY_EXCHANGE, tier.name.to_owned())));
            let ttl = i64::try_from(tier.ttl.as_millis()).expect("fits");
            assert_eq!(arg(&spec, "x-message-ttl"), Some(ArgValue::Int(ttl)));
            assert_eq!(
                arg(&spec, "x-dead-letter-exchange"),
                Some(ArgValue::Str(JOBS_EXCHANGE))
            );
            // A fixed routing key would lose the lane carried in `CC`.
            assert_eq!(arg(&spec, "x-dead-letter-routing-key"), None);
            assert_eq!(
                arg(&spec, "x-dead-letter-strategy"),
                Some(ArgValue::Str("at-least-once"))
            );
        }
    }

    #[test]
    fn dead_queue_is_unbound_and_keeps_everything() {
        let spec = queue(DEAD_QUEUE);
        assert_eq!(spec.binding, None);
        assert_eq!(arg(&spec, "x-message-ttl"), None);
        assert_eq!(arg(&spec, "x-dead-letter-exchange"), None);
    }

    #[test]
    fn argument_table_uses_long_for_numbers() {
        let table = queue("mailroom.retry.5s").argument_table();
        assert_eq!(
            table.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(5000))
        );
        assert_eq!(
            table.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
    }

    #[test]
    fn retry_cc_names_the_work_queue() {
        for (sealed, key) in [(2_400, "bulk"), (LARGE_JOB_BYTES + 1, "bulk.large")] {
            let AMQPValue::FieldArray(keys) = retry_cc(WorkQueue::of(Lane::Bulk, sealed)) else {
                panic!("CC must be an array");
            };
            assert_eq!(keys.as_slice(), [AMQPValue::LongString(key.into())]);
        }
    }

    #[test]
    fn only_jobs_over_the_threshold_are_large() {
        let queue = |bytes| WorkQueue::of(Lane::Transactional, bytes).name();
        assert_eq!(queue(0), "mailroom.send.transactional");
        assert_eq!(queue(LARGE_JOB_BYTES), "mailroom.send.transactional");
        assert_eq!(
            queue(LARGE_JOB_BYTES + 1),
            "mailroom.send.transactional.large"
        );
        assert_eq!(work_queue(Lane::Bulk), "mailroom.send.bulk");
    }
}
