//! `mailroom topology`: what mailroom declares on RabbitMQ, and declaring it.

use std::fmt::Write as _;

use mailroom_core::amqp::Broker;
use mailroom_core::settings::Settings;
use mailroom_core::wire::{ArgValue, Topology};

/// Prints the topology; with `declare`, declares it on the broker first.
pub async fn run(settings: &Settings, declare: bool) -> anyhow::Result<()> {
    let topology = Topology::standard();
    if declare {
        let broker = Broker::connect(&settings.amqp).await?;
        broker.declare(&topology).await?;
        broker.close().await;
        eprintln!("mailroom: topology declared");
    }
    print!("{}", describe(&topology));
    Ok(())
}

fn describe(topology: &Topology) -> String {
    let mut out = String::new();
    for exchange in &topology.exchanges {
        let _ = writeln!(out, "exchange {exchange} (direct, durable)");
    }
    for queue in &topology.queues {
        let binding = queue.binding.as_ref().map_or_else(
            || "unbound (default exchange)".to_owned(),
            |(exchange, key)| format!("bound to {exchange} with key {key:?}"),
        );
        let arguments = queue
            .arguments
            .iter()
            .map(|(key, value)| match value {
                ArgValue::Str(text) => format!("{key}={text:?}"),
                ArgValue::Int(number) => format!("{key}={number}"),
            })
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(out, "queue {} {binding}\n    {arguments}", queue.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_exchange_and_queue() {
        let text = describe(&Topology::standard());
        for name in [
            "mailroom.jobs",
            "mailroom.retry",
            "mailroom.send.transactional",
            "mailroom.send.bulk",
            "mailroom.retry.1s",
            "mailroom.retry.1h",
            "mailroom.dead",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(text.contains("x-message-ttl=30000"), "{text}");
    }
}
