//! Publishing against a scripted broker: the situations a real RabbitMQ
//! shared with other tests cannot be put in on demand (a resource alarm,
//! a socket that takes nothing more, one ack covering a returned message).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::ShortString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::settings::Secret;

/// What the scripted broker does once the client's channel is in confirm mode.
#[derive(Clone, Copy)]
enum Script {
    /// Sends `connection.blocked`, then answers nothing more.
    Block,
    /// Stops reading: the client's socket fills and a publish cannot be sent.
    StopReading,
    /// Returns the second publish as unroutable and acks both first ones
    /// with one `multiple` ack, as RabbitMQ may; acks any later one alone.
    ReturnSecondAckBoth,
}

struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    /// Class and method of a method frame.
    fn method(&self) -> Option<(u16, u16)> {
        (self.kind == 1 && self.payload.len() >= 4).then(|| {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                u16::from_be_bytes([self.payload[2], self.payload[3]]),
            )
        })
    }
}

async fn read_frame(socket: &mut TcpStream) -> Option<Frame> {
    let mut head = [0_u8; 7];
    socket.read_exact(&mut head).await.ok()?;
    let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
    let mut payload = vec![0_u8; usize::try_from(size).ok()? + 1];
    socket.read_exact(&mut payload).await.ok()?;
    payload.pop();
    Some(Frame {
        kind: head[0],
        channel: u16::from_be_bytes([head[1], head[2]]),
        payload,
    })
}

async fn write_frame(socket: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut frame = vec![kind];
    frame.extend(channel.to_be_bytes());
    frame.extend(u32::try_from(payload.len()).expect("small").to_be_bytes());
    frame.extend(payload);
    frame.push(0xCE);
    socket.write_all(&frame).await.expect("write");
}

async fn write_method(socket: &mut TcpStream, channel: u16, class: u16, method: u16, args: &[u8]) {
    let mut payload = class.to_be_bytes().to_vec();
    payload.extend(method.to_be_bytes());
    payload.extend(args);
    write_frame(socket, 1, channel, &payload).await;
}

fn short(text: &str) -> Vec<u8> {
    let mut out = vec![u8::try_from(text.len()).expect("short")];
    out.extend(text.as_bytes());
    out
}

fn long(text: &str) -> Vec<u8> {
    let mut out = u32::try_from(text.len())
        .expect("long")
        .to_be_bytes()
        .to_vec();
    out.extend(text.as_bytes());
    out
}

/// A broker that takes one connection through the handshake, opens
/// channels in confirm mode, then follows `script`.
async fn scripted_broker(script: Script) -> SocketAddr {
    scripted_broker_counting(script).await.0
}

/// [`scripted_broker`], and how many messages it was sent.
async fn scripted_broker_counting(script: Script) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut header = [0_u8; 8];
        socket
            .read_exact(&mut header)
            .await
            .expect("protocol header");
        let mut start = vec![0, 9, 0, 0, 0, 0];
        start.extend(long("PLAIN"));
        start.extend(long("en_US"));
        write_method(&mut socket, 0, 10, 10, &start).await;
        read_frame(&mut socket).await.expect("start-ok");
        let mut tune = 16_u16.to_be_bytes().to_vec();
        tune.extend(131_072_u32.to_be_bytes());
        tune.extend(0_u16.to_be_bytes());
        write_method(&mut socket, 0, 10, 30, &tune).await;
        let mut publishes = 0_u64;
        while let Some(frame) = read_frame(&mut socket).await {
            match frame.method() {
                // connection.open
                Some((10, 40)) => write_method(&mut socket, 0, 10, 41, &short("")).await,
                // connection.close
                Some((10, 50)) => {
                    write_method(&mut socket, 0, 10, 51, &[]).await;
                    return;
                }
                // channel.open
                Some((20, 10)) => {
                    write_method(&mut socket, frame.channel, 20, 11, &long("")).await;
                }
                // confirm.select
                Some((85, 10)) => {
                    write_method(&mut socket, frame.channel, 85, 11, &[]).await;
                    match script {
                        Script::Block => {
                            write_method(&mut socket, 0, 10, 60, &short("low on memory")).await;
                        }
                        // Holds the socket open, reading nothing.
                        Script::StopReading => {
                            tokio::time::sleep(Duration::from_hours(1)).await;
                        }
                        Script::ReturnSecondAckBoth => {}
                    }
                }
                // basic.publish: its header and body frames follow.
                Some((60, 40)) => {
                    publishes += 1;
                    counted.store(publishes, Ordering::SeqCst);
                    if publishes == 2 {
                        return_and_ack(&mut socket, frame.channel, publishes).await;
                    } else if publishes > 2 {
                        let mut ack = publishes.to_be_bytes().to_vec();
                        ack.push(0);
                        write_method(&mut socket, frame.channel, 60, 80, &ack).await;
                    }
                }
                _ => {}
            }
        }
    });
    (addr, count)
}

/// Returns message "second" as unroutable, then acks every tag up to `tag`.
async fn return_and_ack(socket: &mut TcpStream, channel: u16, tag: u64) {
    let mut returned = 312_u16.to_be_bytes().to_vec();
    returned.extend(short("NO_ROUTE"));
    returned.extend(short(""));
    returned.extend(short("nowhere"));
    write_method(socket, channel, 60, 50, &returned).await;
    // A content header: class, weight, no body, only message-id set.
    let mut header = 60_u16.to_be_bytes().to_vec();
    header.extend(0_u16.to_be_bytes());
    header.extend(0_u64.to_be_bytes());
    header.extend(0x0080_u16.to_be_bytes());
    header.extend(short("second"));
    write_frame(socket, 2, channel, &header).await;
    let mut ack = tag.to_be_bytes().to_vec();
    ack.push(1);
    write_method(socket, channel, 60, 80, &ack).await;
}

async fn broker_at(addr: SocketAddr, confirm_timeout: Duration) -> Broker {
    let settings = AmqpSettings {
        urls: vec![Secret::new(format!("amqp://guest:guest@{addr}/%2f"))],
        channels: 1,
        confirm_timeout,
        ..AmqpSettings::default()
    };
    Broker::connect(&settings).await.expect("connect")
}

fn message(id: &str, body: Vec<u8>) -> Outgoing {
    Outgoing {
        exchange: String::new(),
        routing_key: "nowhere".to_owned(),
        body,
        properties: BasicProperties::default().with_message_id(ShortString::from(id)),
        mandatory: true,
    }
}

#[tokio::test]
async fn a_blocked_connection_fails_publishes_at_once() {
    let broker = broker_at(
        scripted_broker(Script::Block).await,
        Duration::from_secs(30),
    )
    .await;
    let session = broker.inner.session.read().await.clone();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !session.connection.status().blocked() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the client saw connection.blocked");
    let start = Instant::now();
    let err = broker
        .publish(message("first", b"hello".to_vec()))
        .await
        .expect_err("blocked");
    assert!(matches!(err, PublishError::Blocked), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// A publish that cannot be written (a broker that blocks, or reads
/// nothing) ends within `amqp.confirm_timeout` instead of hanging.
#[tokio::test]
async fn a_publish_that_cannot_be_sent_times_out() {
    let timeout = Duration::from_millis(500);
    let broker = broker_at(scripted_broker(Script::StopReading).await, timeout).await;
    // Far more than the socket buffers of both ends hold.
    let body = vec![0_u8; 64 << 20];
    let start = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        broker.publish(message("first", body)),
    )
    .await
    .expect("the publish ended");
    let err = outcome.expect_err("not sent");
    assert!(matches!(err, PublishError::ConfirmTimeout(_)), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// lapin hands a return to whichever publish one `multiple` ack resolves
/// first. A publish given another's return is not unroutable (its own was
/// acked), and the other, told "acked", is published again, so that no
/// publish is reported queued that was not.
#[tokio::test]
async fn a_return_given_to_the_wrong_publish_is_published_again() {
    let mut mismatched = 0;
    for _ in 0..20 {
        let (addr, publishes) = scripted_broker_counting(Script::ReturnSecondAckBoth).await;
        let broker = broker_at(addr, Duration::from_secs(5)).await;
        let (first, second) =
            tokio::join!(broker.publish(message("first", b"1".to_vec())), async {
                // After the first, so the broker sees them in this order.
                tokio::task::yield_now().await;
                broker.publish(message("second", b"2".to_vec())).await
            },);
        assert!(first.is_ok(), "first: {first:?}");
        match second {
            // Its return went to the first, which sent it again.
            Ok(()) => {
                mismatched += 1;
                assert_eq!(publishes.load(Ordering::SeqCst), 3, "published again");
            }
            Err(PublishError::Unroutable { .. }) => {
                assert_eq!(publishes.load(Ordering::SeqCst), 2);
            }
            other => panic!("second: {other:?}"),
        }
        broker.close().await;
    }
    // The attribution is lapin's hash order: over 20 rounds, both happen.
    assert!(mismatched > 0, "the scripted return never went astray");
}
