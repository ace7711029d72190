//! The API's listener against clients that hold connections: a deadline
//! for a request's headers (which also ends idle keep-alive connections)
//! and a cap on connections served at once.

use std::time::{Duration, Instant};

use mailroom_core::settings::Settings;
use mailroom_producer::api::Api;
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::TestPrefix;
use mailroom_tests::stack::{api_with_key, serve_api};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Serves an API made with `settings` on a free port until the token is
/// cancelled.
async fn serve(settings: &Settings) -> (u16, CancellationToken) {
    serve_api(Api::connect(settings).await.expect("api")).await
}

/// Reads until the server closes the connection; what it sent.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut answer))
        .await
        .ok()
        .map(|_| String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off_at_the_header_timeout() {
    let (vhost, redis) = (TestVhost::new("api-slow"), TestPrefix::new("api-slow"));
    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.header_timeout = Duration::from_secs(1);
    let (port, shutdown) = serve(&settings).await;

    // Half a request's headers, then nothing more.
    let mut slow = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    slow.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: api\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let answer = read_to_close(&mut slow, Duration::from_secs(5))
        .await
        .expect("the server closes a slow client's connection");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(!answer.contains("202"), "{answer}");

    // A keep-alive connection that served a request, then went idle.
    let mut idle = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut idle, Duration::from_secs(5))
        .await
        .expect("the server closes an idle connection");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.cancel();
}

/// A client that sends pipelined requests and never reads the answers is
/// cut off once a write has waited the header timeout, instead of holding
/// its connection for ever.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off() {
    let (vhost, redis) = (
        TestVhost::new("api-slowread"),
        TestPrefix::new("api-slowread"),
    );
    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.header_timeout = Duration::from_secs(1);
    let (port, shutdown) = serve(&settings).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // A small receive window, so the server's writes stall soon.
    socket.set_recv_buffer_size(4096).expect("buffer");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let requests = "GET /openapi.json HTTP/1.1\r\nHost: api\r\n\r\n".repeat(500);
    // The server stops reading once its answers back up; what it did not
    // read is of no matter.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        stream.write_all(requests.as_bytes()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let answers = read_to_close(&mut stream, Duration::from_secs(30))
        .await
        .expect("the connection is closed");
    // Had the server waited, all 500 would have come once we read.
    let served = answers.matches("HTTP/1.1 200").count();
    assert!(
        served < 500,
        "the stalled connection was kept: {served} answers"
    );
    shutdown.cancel();
}

/// Headers over the connection's 16 KiB buffer are refused with 431 rather
/// than held; headers just under it pass, and a message larger than the
/// buffer still streams through.
#[tokio::test]
async fn oversized_headers_are_refused_and_large_bodies_still_read() {
    let (vhost, redis) = (TestVhost::new("api-head"), TestPrefix::new("api-head"));
    let settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    let (api, key) = api_with_key(&settings).await;
    let (port, shutdown) = serve_api(api).await;

    // hyper checks the limit between reads, so a head can pass it by a
    // read's worth: the refused one is well over.
    for (kib, wanted) in [(12, "HTTP/1.1 200"), (64, "HTTP/1.1 431")] {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: api\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(kib * 1024)
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let answer = read_to_close(&mut stream, Duration::from_secs(5))
            .await
            .expect("the server answers and closes");
        assert!(answer.starts_with(wanted), "{kib} KiB of headers: {answer}");
    }

    let json = serde_json::json!({"message": {
        "from": "shop@example.com",
        "to": ["ada@example.org"],
        "subject": "large",
        "text": "a line of a long letter\n".repeat(40_000),
    }})
    .to_string();
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: api\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}",
        json.len()
    );
    let mut body = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    body.write_all(request.as_bytes()).await.expect("write");
    let answer = read_to_close(&mut body, Duration::from_secs(10))
        .await
        .expect("the server answers");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    shutdown.cancel();
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_free_slot() {
    let (vhost, redis) = (TestVhost::new("api-cap"), TestPrefix::new("api-cap"));
    let mut settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    settings.api.max_connections = 1;
    settings.api.header_timeout = Duration::from_secs(30);
    let (port, shutdown) = serve(&settings).await;

    let holder = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // Give the listener time to take the holder's connection first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut waiting = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    assert!(
        read_to_close(&mut waiting, Duration::from_millis(500))
            .await
            .is_none(),
        "served beyond the cap"
    );
    drop(holder);
    let answer = read_to_close(&mut waiting, Duration::from_secs(5))
        .await
        .expect("served once the slot is free");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.cancel();
}
