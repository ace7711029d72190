//! A client that goes away in the middle of its body, against the API's
//! real listener (hyper's own error for it). Alone in its binary: it reads
//! the log through a thread's own subscriber, which the other listener
//! tests' servers, running beside it, kept from seeing events.

use std::time::{Duration, Instant};

use mailroom_tests::logs::Captured;
use mailroom_tests::rabbit::TestVhost;
use mailroom_tests::redis::TestPrefix;
use mailroom_tests::stack::{api_with_key, serve_api};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// A client that goes away in the middle of its body is logged 499
/// (nginx's "client closed request"), with its caller, not 400 as if it
/// had sent a bad request.
#[tokio::test]
async fn a_client_gone_mid_body_is_logged_499() {
    let (vhost, redis) = (
        TestVhost::new("api-gone-body"),
        TestPrefix::new("api-gone-body"),
    );
    let settings = mailroom_tests::stack::base_settings(&vhost, &redis);
    let (api, key) = api_with_key(&settings).await;
    let captured = Captured::default();
    let _guard = captured.install();
    let (port, shutdown) = serve_api(api).await;
    let mut client = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"mess"
    );
    client.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    while captured.access_lines().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = captured.access_lines();
    assert_eq!(lines.len(), 1, "{lines:?} {}", captured.text());
    assert_eq!(lines[0]["status"], 499, "{lines:?}");
    assert_eq!(lines[0]["tenant"], "acme", "{lines:?}");
    shutdown.cancel();
}
