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
