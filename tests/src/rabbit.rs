//! A RabbitMQ vhost of a test's own, made with `rabbitmqctl` and deleted
//! when dropped.

use std::process::Command;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use mailroom_core::amqp::Broker;
use mailroom_core::settings::{AmqpSettings, Secret};
use mailroom_core::wire::Topology;

/// Where the tests' broker listens.
pub const BROKER: &str = "127.0.0.1:5672";

/// A vhost that exists for as long as this value lives.
pub struct TestVhost {
    name: String,
}

impl TestVhost {
    /// Creates a fresh vhost with full permissions for `guest`.
    ///
    /// # Panics
    /// When RabbitMQ is not running or `rabbitmqctl` fails, with the command
    /// that starts it.
    pub fn new(label: &str) -> Self {
        assert_broker_up();
        let name = crate::unique(&format!("mailroom-test-{label}"));
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        Self { name }
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An `amqp://` URL into the vhost as guest.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{BROKER}/{}", self.name)
    }

    /// Broker settings pointing into the vhost.
    pub fn settings(&self) -> AmqpSettings {
        AmqpSettings {
            urls: vec![Secret::new(self.url())],
            ..AmqpSettings::default()
        }
    }

    /// Jobs waiting in the work queues (the topology is declared first,
    /// so an untouched vhost reads 0).
    ///
    /// # Panics
    /// When the broker cannot be asked.
    pub async fn work_depth(&self) -> u32 {
        let broker = self.declared().await;
        let depth = broker.work_depth().await.expect("depth");
        broker.close().await;
        depth
    }

    /// A broker connection to this vhost, mailroom's topology declared.
    ///
    /// # Panics
    /// When the broker cannot be reached or refuses the topology.
    pub async fn declared(&self) -> Broker {
        let broker = Broker::connect(&self.settings()).await.expect("broker");
        broker
            .declare(&Topology::standard())
            .await
            .expect("topology");
        broker
    }

    /// Declares `name` as a plain durable classic queue, in the way of a
    /// topology that wants it with other arguments.
    ///
    /// # Panics
    /// When the broker refuses.
    pub async fn declare_classic_queue(&self, name: &str) {
        let broker = Broker::connect(&self.settings()).await.expect("broker");
        let channel = broker.channel().await.expect("channel");
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a classic queue");
        broker.close().await;
    }

    /// Closes every connection named `name` in this vhost, as a broker
    /// restart or a network cut would. Returns how many were closed.
    pub fn close_connections(&self, name: &str) -> usize {
        let listing = rabbitmqctl(&[
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "vhost",
            "client_properties",
        ]);
        let mut closed = 0;
        for line in listing.lines() {
            let mut fields = line.split('\t');
            let (Some(pid), Some(vhost)) = (fields.next(), fields.next()) else {
                continue;
            };
            let properties = fields.collect::<Vec<_>>().join("\t");
            if vhost == self.name && properties.contains(&format!("\"{name}\"")) {
                rabbitmqctl(&["close_connection", pid, "closed by a test"]);
                closed += 1;
            }
        }
        closed
    }
}

impl TestVhost {
    /// An `amqp://` URL into the vhost through `proxy`.
    pub fn url_via(&self, proxy: &RewritingProxy) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{}", proxy.port, self.name)
    }
}

/// A TCP proxy to the broker that replaces `from` with `to` (as long) in
/// what clients send, so a test can put bytes on the wire that no client
/// library would send. A marker split across two reads would pass
/// unchanged; a frame of a few hundred bytes on loopback arrives whole.
pub struct RewritingProxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl RewritingProxy {
    /// Listens on a free loopback port.
    ///
    /// # Panics
    /// When `from` and `to` differ in length, or no port can be bound.
    pub async fn start(from: &'static [u8], to: &'static [u8]) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        assert_eq!(from.len(), to.len(), "a rewrite keeps frame lengths");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("bound address").port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(broker) = tokio::net::TcpStream::connect(BROKER).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut broker_read, mut broker_write) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                        let read = &mut buf[..n];
                        let mut at = 0;
                        while let Some(found) =
                            read[at..].windows(from.len()).position(|w| w == from)
                        {
                            read[at + found..at + found + to.len()].copy_from_slice(to);
                            at += found + to.len();
                        }
                        if broker_write.write_all(read).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for RewritingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// Runs `rabbitmqctl -q ARGS` and returns its output.
///
/// # Panics
/// When it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "rabbitmqctl not found ({err}): install it with `apt-get install rabbitmq-server`"
            )
        });
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn assert_broker_up() {
    assert!(
        std::net::TcpStream::connect(BROKER).is_ok(),
        "RabbitMQ is not running on {BROKER}: start it with `rabbitmq-server -detached` (or run .ci/run)"
    );
}
