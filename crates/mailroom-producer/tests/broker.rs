//! The producer against a real RabbitMQ, each test in its own vhost.

use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldTable};
use mailroom_core::amqp::{AmqpError, Broker, Outgoing, PublishError};
use mailroom_core::job::{EmailMessage, JobRequest, Lane, SendJob};
use mailroom_core::seal::{Keyring, SealKey};
use mailroom_core::settings::{AmqpSettings, Secret};
use mailroom_core::validate::Limits;
use mailroom_core::wire::{self, CONTENT_TYPE, Topology, headers};
use mailroom_producer::{EnqueueError, Producer, prepare};
use mailroom_tests::rabbit::{BROKER, TestVhost};

fn keyring() -> Keyring {
    Keyring::new(vec![SealKey::generate("k1").expect("kid")], None).expect("keyring")
}

fn request(to: &str, lane: Lane) -> JobRequest {
    JobRequest {
        tenant: None,
        idempotency_key: None,
        lane,
        expires_at: None,
        message: EmailMessage {
            from: "Shop <shop@example.com>".to_owned(),
            to: vec![to.to_owned()],
            subject: "Your receipt".to_owned(),
            text: Some("Thank you.".to_owned()),
            ..EmailMessage::default()
        },
    }
}

fn job(lane: Lane) -> SendJob {
    prepare(request("ada@example.org", lane), "acme", &Limits::default())
        .expect("valid")
        .into_job()
}

async fn producer(vhost: &TestVhost, keyring: Keyring) -> Producer {
    producer_with(&vhost.settings(), keyring).await
}

async fn producer_with(settings: &AmqpSettings, keyring: Keyring) -> Producer {
    let broker = Broker::connect_as(settings, "producer-test")
        .await
        .expect("connect");
    broker
        .declare(&Topology::standard())
        .await
        .expect("declare");
    Producer::from_parts(broker, keyring, Limits::default())
}

async fn depth(broker: &Broker, queue: &str) -> u32 {
    broker.queue_depth(queue).await.expect("depth")
}

fn header_text(table: &FieldTable, name: &str) -> String {
    match table.inner().get(name) {
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn an_enqueued_job_comes_back_sealed_with_its_headers() {
    let vhost = TestVhost::new("roundtrip");
    let keyring = keyring();
    let producer = producer(&vhost, keyring.clone()).await;
    let job = job(Lane::Bulk);
    let id = producer.enqueue(job.clone()).await.expect("enqueued");
    assert_eq!(id, job.id);

    let channel = producer.broker().channel().await.expect("channel");
    let message = channel
        .basic_get(
            wire::work_queue(Lane::Bulk).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("a message in the bulk queue");
    let delivery = message.delivery;
    let properties = &delivery.properties;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        Some(id.to_string())
    );
    assert_eq!(
        properties
            .content_type()
            .as_ref()
            .map(lapin::types::ShortString::as_str),
        Some(CONTENT_TYPE)
    );
    let table = properties.headers().clone().expect("headers");
    assert_eq!(header_text(&table, headers::KID), "k1");
    assert_eq!(header_text(&table, headers::TENANT), "acme");
    assert_eq!(header_text(&table, headers::LANE), "bulk");
    assert_eq!(
        table.inner().get(headers::ATTEMPT),
        Some(&AMQPValue::LongLongInt(1))
    );
    let body = String::from_utf8_lossy(&delivery.data);
    assert!(
        !body.contains("ada@example.org") && !body.contains("receipt"),
        "body is sealed"
    );
    let opened = keyring
        .open("k1", &id, "acme", &delivery.data)
        .expect("opens");
    assert_eq!(opened, job);
    producer.close().await;
}

#[tokio::test]
async fn a_thousand_concurrent_enqueues_are_all_confirmed_and_queued() {
    let vhost = TestVhost::new("concurrent");
    let producer = producer(&vhost, keyring()).await;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let producer = producer.clone();
            tokio::spawn(async move { producer.enqueue(job(Lane::Transactional)).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("confirmed");
    }
    assert_eq!(
        depth(producer.broker(), &wire::work_queue(Lane::Transactional)).await,
        1000
    );
    producer.close().await;
}

#[tokio::test]
async fn enqueue_many_confirms_every_job_in_order() {
    let vhost = TestVhost::new("many");
    let producer = producer(&vhost, keyring()).await;
    let jobs: Vec<_> = (0..2000).map(|_| job(Lane::Bulk)).collect();
    let ids: Vec<_> = jobs.iter().map(|job| job.id).collect();
    let results = producer.enqueue_many(jobs).await;
    let confirmed: Vec<_> = results.into_iter().map(|r| r.expect("confirmed")).collect();
    assert_eq!(confirmed, ids);
    assert_eq!(
        depth(producer.broker(), &wire::work_queue(Lane::Bulk)).await,
        2000
    );
    producer.close().await;
}

#[tokio::test]
async fn a_job_over_the_large_job_threshold_goes_to_its_lanes_large_job_queue() {
    let vhost = TestVhost::new("large");
    let producer = producer(&vhost, keyring()).await;
    for lane in Lane::ALL {
        let mut large = job(lane);
        large.message.text = Some("x".repeat(wire::LARGE_JOB_BYTES));
        producer.enqueue(large).await.expect("confirmed");
        producer.enqueue(job(lane)).await.expect("confirmed");
    }
    for queue in wire::WorkQueue::ALL {
        assert_eq!(
            depth(producer.broker(), &queue.name()).await,
            1,
            "{queue:?}"
        );
    }
    producer.close().await;
}

#[tokio::test]
async fn an_invalid_job_is_refused_and_nothing_is_published() {
    let vhost = TestVhost::new("invalid");
    let producer = producer(&vhost, keyring()).await;
    let mut bad = job(Lane::Transactional);
    bad.message.to = vec!["not an address".to_owned()];
    bad.message.subject = "line\r\nBcc: victim@example.com".to_owned();
    match producer.enqueue(bad).await {
        Err(EnqueueError::Invalid(errors)) => {
            let text = errors.to_string();
            assert!(
                text.contains("message.to[0]") && text.contains("message.subject"),
                "{text}"
            );
        }
        other => panic!("expected invalid, got {other:?}"),
    }
    assert_eq!(
        depth(producer.broker(), &wire::work_queue(Lane::Transactional)).await,
        0
    );
    producer.close().await;
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error() {
    let vhost = TestVhost::new("unroutable");
    let broker = Broker::connect(&vhost.settings()).await.expect("connect");
    broker
        .declare(&Topology::standard())
        .await
        .expect("declare");
    let result = broker
        .publish(Outgoing {
            exchange: wire::JOBS_EXCHANGE.to_owned(),
            routing_key: "no-such-lane".to_owned(),
            body: b"x".to_vec(),
            properties: lapin::BasicProperties::default(),
            mandatory: true,
        })
        .await;
    assert!(
        matches!(result, Err(PublishError::Unroutable { .. })),
        "{result:?}"
    );
    // The channel that saw the return still publishes.
    let producer = Producer::from_parts(broker, keyring(), Limits::default());
    producer
        .enqueue(job(Lane::Transactional))
        .await
        .expect("still publishes");
    producer.close().await;
}

#[tokio::test]
async fn a_publish_to_a_missing_exchange_fails_and_the_broker_recovers() {
    let vhost = TestVhost::new("noexchange");
    let broker = Broker::connect(&vhost.settings()).await.expect("connect");
    let result = broker
        .publish(Outgoing {
            exchange: "mailroom.nowhere".to_owned(),
            routing_key: "x".to_owned(),
            body: b"x".to_vec(),
            properties: lapin::BasicProperties::default(),
            mandatory: true,
        })
        .await;
    assert!(
        result.is_err(),
        "publishing to a missing exchange must fail"
    );
    broker
        .declare(&Topology::standard())
        .await
        .expect("declare");
    let producer = Producer::from_parts(broker, keyring(), Limits::default());
    for _ in 0..8 {
        producer
            .enqueue(job(Lane::Transactional))
            .await
            .expect("every channel works again");
    }
    producer.close().await;
}

#[tokio::test]
async fn declaring_twice_is_fine_and_a_clashing_queue_is_named() {
    let vhost = TestVhost::new("declare");
    let broker = Broker::connect(&vhost.settings()).await.expect("connect");
    broker.declare(&Topology::standard()).await.expect("first");
    broker.declare(&Topology::standard()).await.expect("second");

    let other = TestVhost::new("clash");
    other
        .declare_classic_queue(wire::work_queue(Lane::Bulk).as_str())
        .await;
    let broker = Broker::connect(&other.settings()).await.expect("connect");
    match broker.declare(&Topology::standard()).await {
        Err(err @ AmqpError::QueueMismatch { .. }) => {
            assert!(err.to_string().contains("mailroom.send.bulk"), "{err}");
        }
        other => panic!("expected a queue mismatch, got {other:?}"),
    }
}

/// The error connecting to `vhost` gives: the broker refused the vhost.
async fn refused(vhost: &TestVhost) -> AmqpError {
    let err = Broker::connect(&vhost.settings())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, AmqpError::NotAllowed { .. }), "{err:?}");
    err
}

/// A vhost the user has no permissions on, and one at its connection
/// limit, are refused with the broker's reason: the operator's fix
/// differs (only the limit passes with time).
#[tokio::test]
async fn a_refused_vhost_says_why() {
    let vhost = TestVhost::new("refused-vhost");
    let rabbitmqctl = mailroom_tests::rabbit::rabbitmqctl;
    rabbitmqctl(&[
        "set_vhost_limits",
        "-p",
        vhost.name(),
        r#"{"max-connections": 0}"#,
    ]);
    let err = refused(&vhost).await;
    assert!(err.to_string().contains("connection limit"), "{err}");
    assert!(
        err.is_transient(),
        "a place frees up when a connection closes"
    );

    rabbitmqctl(&["clear_vhost_limits", "-p", vhost.name()]);
    rabbitmqctl(&["clear_permissions", "-p", vhost.name(), "guest"]);
    let err = refused(&vhost).await;
    assert!(err.to_string().contains("set_permissions"), "{err}");
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_wrong_password_is_refused_quickly_and_without_the_password() {
    let vhost = TestVhost::new("password");
    let settings = AmqpSettings {
        urls: vec![Secret::new(format!(
            "amqp://guest:not-the-password@{BROKER}/{}",
            vhost.name()
        ))],
        ..AmqpSettings::default()
    };
    let start = Instant::now();
    let err = Broker::connect(&settings).await.err().expect("refused");
    assert!(matches!(err, AmqpError::AccessRefused { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    assert!(!err.to_string().contains("not-the-password"), "{err}");
}

#[tokio::test]
async fn an_unreachable_broker_is_named_without_the_password() {
    let settings = AmqpSettings {
        urls: vec![Secret::new("amqp://guest:s3cret@127.0.0.1:1/%2f")],
        connect_timeout: Duration::from_millis(500),
        ..AmqpSettings::default()
    };
    let err = Broker::connect(&settings).await.err().expect("unreachable");
    let text = err.to_string();
    assert!(matches!(err, AmqpError::Unreachable { .. }), "{err:?}");
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("s3cret"),
        "{text}"
    );
}

#[tokio::test]
async fn the_producer_survives_its_connection_being_closed() {
    let vhost = TestVhost::new("reconnect");
    let broker = Broker::connect_as(&vhost.settings(), "reconnect-test")
        .await
        .expect("connect");
    broker
        .declare(&Topology::standard())
        .await
        .expect("declare");
    let producer = Producer::from_parts(broker, keyring(), Limits::default());
    producer
        .enqueue(job(Lane::Transactional))
        .await
        .expect("before");

    assert_eq!(vhost.close_connections("reconnect-test"), 1);
    // The call that finds the connection dead may fail (retryably); a job
    // is then not counted, and a later call reconnects.
    let mut confirmed = 1;
    let mut recovered = false;
    for _ in 0..20 {
        match producer.enqueue(job(Lane::Transactional)).await {
            Ok(_) => {
                confirmed += 1;
                recovered = true;
                break;
            }
            Err(err) => {
                assert!(err.is_retryable(), "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        recovered,
        "no enqueue succeeded after the connection was closed"
    );
    assert_eq!(
        depth(producer.broker(), &wire::work_queue(Lane::Transactional)).await,
        confirmed,
        "exactly the confirmed jobs are queued"
    );
    producer.close().await;
}

/// RabbitMQ 3.10 keeps a channel that met a full quorum queue's
/// `reject-publish` nacking after the limit is lifted, where a new channel
/// publishes at once: the producer replaces a channel after a nack, so
/// enqueueing works again as soon as the limit is gone.
#[tokio::test]
async fn enqueueing_works_again_once_a_full_queue_takes_messages() {
    let vhost = TestVhost::new("producer-reject-publish");
    let mut settings = vhost.settings();
    settings.channels = 1;
    let producer = producer_with(&settings, keyring()).await;
    let queue = wire::work_queue(Lane::Transactional);
    let policy = r#"{"max-length":1,"overflow":"reject-publish"}"#;
    mailroom_tests::rabbit::rabbitmqctl(&[
        "set_policy",
        "-p",
        vhost.name(),
        "full",
        &format!("^{queue}$"),
        policy,
        "--apply-to",
        "queues",
    ]);
    // The policy takes a moment to reach the queue.
    let start = Instant::now();
    let mut nacked = 0;
    while nacked < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "never refused");
        if let Err(err) = producer.enqueue(job(Lane::Transactional)).await {
            assert!(
                matches!(err, EnqueueError::Publish(PublishError::Nacked)),
                "{err}"
            );
            nacked += 1;
        }
    }
    mailroom_tests::rabbit::rabbitmqctl(&["clear_policy", "-p", vhost.name(), "full"]);
    let start = Instant::now();
    loop {
        if producer.enqueue(job(Lane::Transactional)).await.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still refused after the limit was lifted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    producer.close().await;
}
