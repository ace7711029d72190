//! The broker plumbing both roles stand on: connecting (and reconnecting)
//! to the first reachable node of `amqp.urls`, declaring the topology, and
//! publishing with publisher confirms.
//!
//! A [`Broker`] is cheap to clone and safe to share. It holds one
//! connection and a small pool of confirm-mode channels, picked round-robin
//! so concurrent publishers do not queue on one. When the connection dies,
//! the publish that finds out fails with a retryable error and the next one
//! opens a fresh connection (with `backon`'s jittered exponential backoff);
//! a message is never reported published unless the broker confirmed it.

mod connect;
mod declare;
mod error;
mod reconnect;

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, RwLock};

pub use error::{AmqpError, PublishError};
use reconnect::Reconnects;

use crate::settings::AmqpSettings;
use crate::wire::{Topology, WorkQueue};

/// One message to publish.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Exchange (`""` for the default exchange).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub body: Vec<u8>,
    /// Properties and headers.
    pub properties: BasicProperties,
    /// Return the message if no queue is bound for it (reported as
    /// [`PublishError::Unroutable`]).
    pub mandatory: bool,
}

/// What [`Broker::readiness`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Connected and taking publishes.
    Up,
    /// Connected, but a memory or disk alarm holds every publish.
    Blocked,
    /// Not connected (a reconnect is under way).
    Down,
}

impl Readiness {
    /// How `/readyz` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Blocked => "blocked",
            Self::Down => "down",
        }
    }
}

/// A connection to the broker with a pool of confirm-mode channels.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    settings: AmqpSettings,
    name: String,
    session: RwLock<Arc<Session>>,
    /// One reconnect serves every caller that found the old session dead.
    reconnects: Reconnects,
    next: AtomicUsize,
}

/// One connection's life: replaced whole when the connection dies.
struct Session {
    connection: Connection,
    channels: Vec<Channel>,
    /// Channels replaced after a channel-level error (e.g. publishing to an
    /// exchange that does not exist closes the channel), or a nack, each
    /// with when it was opened.
    replaced: Vec<Mutex<Option<(Channel, Instant)>>>,
    /// Slots whose original channel was retired after a nack.
    retired: Vec<AtomicBool>,
}

impl Session {
    fn alive(&self) -> bool {
        self.connection.status().connected()
    }
}

impl Broker {
    /// Connects to the first reachable URL of `settings.urls`.
    pub async fn connect(settings: &AmqpSettings) -> Result<Self, AmqpError> {
        Self::connect_as(settings, "mailroom").await
    }

    /// Connects, naming the connection `name` (shown in the management UI
    /// and by `rabbitmqctl list_connections`).
    pub async fn connect_as(settings: &AmqpSettings, name: &str) -> Result<Self, AmqpError> {
        let session = open_session(settings, name).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                name: name.to_owned(),
                session: RwLock::new(Arc::new(session)),
                reconnects: Reconnects::default(),
                next: AtomicUsize::new(0),
            }),
        })
    }

    /// The connection's name.
    pub fn connection_name(&self) -> &str {
        &self.inner.name
    }

    /// Unconfirmed messages a batch publish may keep in flight.
    pub fn publish_window(&self) -> usize {
        self.inner.settings.publish_window
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner
            .session
            .try_read()
            .map_or(true, |session| session.alive())
    }

    /// Whether the broker takes publishes now. A connection found dead is
    /// reconnected in the background (one reconnect for every caller), so a
    /// probe sees it come back without waiting for a publish to find out,
    /// and without waiting for it either.
    pub fn readiness(&self) -> Readiness {
        let Ok(session) = self.inner.session.try_read() else {
            // Being replaced right now.
            return Readiness::Down;
        };
        if !session.alive() {
            let broker = self.clone();
            tokio::spawn(async move { broker.session().await.map(drop) });
            return Readiness::Down;
        }
        if session.connection.status().blocked() {
            return Readiness::Blocked;
        }
        Readiness::Up
    }

    /// A fresh channel on the current connection, for consumers and other
    /// work that needs its own (reconnecting first if the connection died).
    pub async fn channel(&self) -> Result<Channel, AmqpError> {
        let session = self.session().await?;
        session
            .connection
            .create_channel()
            .await
            .map_err(|err| AmqpError::Broker(err.to_string()))
    }

    /// Messages ready in `queue` (which must exist).
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, AmqpError> {
        let channel = self.channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|err| AmqpError::Broker(err.to_string()));
        let _ = channel.close(200, "done".into()).await;
        Ok(declared?.message_count())
    }

    /// Jobs ready in every work queue (which must exist).
    pub async fn work_depth(&self) -> Result<u32, AmqpError> {
        let mut depth = 0;
        for queue in WorkQueue::ALL {
            depth += self.queue_depth(&queue.name()).await?;
        }
        Ok(depth)
    }

    /// Publishes one message and waits for the broker's confirm, at most
    /// `amqp.confirm_timeout` in all.
    pub async fn publish(&self, message: Outgoing) -> Result<(), PublishError> {
        let session = self.session().await?;
        // A broker short of memory or disk holds every publish unsent until
        // the alarm clears: say so now rather than wait the timeout out.
        if session.connection.status().blocked() {
            return Err(PublishError::Blocked);
        }
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed) % session.channels.len();
        let channel = self.publishing_channel(&session, slot).await?;
        let channel_id = channel.id();
        let options = BasicPublishOptions {
            mandatory: message.mandatory,
            ..BasicPublishOptions::default()
        };
        let Outgoing {
            exchange,
            routing_key,
            body,
            properties,
            ..
        } = message;
        let message_id = properties.message_id().clone();
        let timeout = self.inner.settings.confirm_timeout;
        // One deadline over sending and the confirm: sending waits as long
        // as the broker blocks the connection, which may begin after the
        // check above.
        let (to_exchange, to_key) = (exchange.as_str().into(), routing_key.as_str().into());
        let confirmation = tokio::time::timeout(timeout, async move {
            let confirm = channel
                .basic_publish(to_exchange, to_key, options, &body, properties)
                .await?;
            // lapin holds its own copy until it is written; this one need
            // not wait for the confirm (a window of large messages would
            // add up).
            drop(body);
            confirm.await
        })
        .await
        .map_err(|_| {
            if session.connection.status().blocked() {
                PublishError::Blocked
            } else {
                PublishError::ConfirmTimeout(timeout)
            }
        })?
        .map_err(|err| PublishError::Connection(err.to_string()))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            // lapin hands a return to whichever publish an ack resolves
            // first; when one ack covers several, that may not be its own.
            // Its own was then told "acked" and reported queued: the whole
            // message is here, so it is published again to make that true.
            Confirmation::Ack(Some(returned))
                if returned.delivery.properties.message_id() != &message_id =>
            {
                self.publish_returned(returned).await;
                Ok(())
            }
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange,
                routing_key,
            }),
            Confirmation::Nack(_) => {
                self.retire(&session, slot, channel_id).await;
                Err(PublishError::Nacked)
            }
            // Only on a channel without confirms, which ours never are; a
            // publish nobody confirmed is not reported as done.
            Confirmation::NotRequested => Err(PublishError::Connection(
                "channel has no publisher confirms".to_owned(),
            )),
        }
    }

    /// Publishes again a message the broker returned as unroutable whose
    /// own publish lapin reported acked (it gave the return to another),
    /// declaring the topology first if it is returned again. Boxed: it
    /// publishes through [`Broker::publish`], which calls it.
    fn publish_returned(
        &self,
        returned: BasicReturnMessage,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let delivery = returned.delivery;
            let job_id = delivery.properties.message_id().clone();
            let again = Outgoing {
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
                body: delivery.data,
                properties: delivery.properties,
                mandatory: true,
            };
            let mut result = self.publish(again.clone()).await;
            if matches!(result, Err(PublishError::Unroutable { .. })) {
                if let Err(err) = self.declare(&Topology::standard()).await {
                    tracing::warn!(error = %err, "the topology could not be declared again");
                }
                result = self.publish(again).await;
            }
            match result {
                Ok(()) => tracing::info!(
                    job_id = job_id.as_ref().map(ShortString::as_str),
                    "a returned message reported queued was published again"
                ),
                Err(err) => tracing::error!(
                    job_id = job_id.as_ref().map(ShortString::as_str),
                    error = %err,
                    "a message the broker returned was reported queued and could not be \
                     published again: it is not queued"
                ),
            }
        })
    }

    /// Closes the connection; unacked deliveries return to their queues.
    /// A broker that does not answer within `amqp.connect_timeout` is left
    /// to notice the closed socket.
    pub async fn close(&self) {
        let session = self.inner.session.read().await.clone();
        if !session.alive() {
            return;
        }
        let closing = session.connection.close(200, "bye".into());
        match tokio::time::timeout(self.inner.settings.connect_timeout, closing).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "closing the broker connection"),
            Err(_) => tracing::warn!("the broker did not answer the connection close"),
        }
    }

    /// The current session, or a new one if the connection died.
    async fn session(&self) -> Result<Arc<Session>, AmqpError> {
        let current = self.inner.session.read().await.clone();
        if current.alive() {
            return Ok(current);
        }
        // Boxed: reconnecting is a large future, rarely run; inline, every
        // publish would carry (and move) its space.
        Box::pin(self.reconnect()).await
    }

    /// A session in place of the lost one: opened here, or by the caller
    /// already reconnecting.
    async fn reconnect(&self) -> Result<Arc<Session>, AmqpError> {
        let inner = &self.inner;
        let alive = async {
            let current = inner.session.read().await.clone();
            current.alive().then_some(current)
        };
        let reconnect = async {
            tracing::warn!(connection = %inner.name, "broker connection lost: reconnecting");
            let fresh = Arc::new(open_session(&inner.settings, &inner.name).await?);
            *inner.session.write().await = Arc::clone(&fresh);
            Ok(fresh)
        };
        inner.reconnects.run(alive, reconnect).await
    }

    /// The channel of `slot`, replaced by a new confirm-mode one if a
    /// channel-level error closed it. Borrowed when it is the original: a
    /// lapin channel clone is a dozen reference counts, on every publish.
    async fn publishing_channel<'s>(
        &self,
        session: &'s Session,
        slot: usize,
    ) -> Result<Cow<'s, Channel>, PublishError> {
        let original = &session.channels[slot];
        if original.status().connected() && !session.retired[slot].load(Ordering::Acquire) {
            return Ok(Cow::Borrowed(original));
        }
        let mut replaced = session.replaced[slot].lock().await;
        if let Some((channel, _)) = replaced.as_ref()
            && channel.status().connected()
        {
            return Ok(Cow::Owned(channel.clone()));
        }
        let channel = Box::pin(confirm_channel(&session.connection))
            .await
            .map_err(|err| PublishError::Connection(err.to_string()))?;
        *replaced = Some((channel.clone(), Instant::now()));
        Ok(Cow::Owned(channel))
    }

    /// Stops publishing on `slot`'s channel `id` after the broker nacked a
    /// message on it: RabbitMQ 3.10 keeps a channel that met a full quorum
    /// queue's `reject-publish` nacking after the limit is lifted, until
    /// it is closed, where a new channel publishes at once. The next
    /// publish opens a new channel; the old one is closed once every
    /// confirm it owes has come or timed out. A replacement is replaced at
    /// most once a [`RENEW_AFTER`], so a queue that stays full does not
    /// churn channels.
    async fn retire(&self, session: &Session, slot: usize, id: u16) {
        let old = if session.channels[slot].id() == id {
            (!session.retired[slot].swap(true, Ordering::AcqRel))
                .then(|| session.channels[slot].clone())
        } else {
            let mut replaced = session.replaced[slot].lock().await;
            match replaced.as_ref() {
                Some((channel, opened))
                    if channel.id() == id && opened.elapsed() >= RENEW_AFTER =>
                {
                    replaced.take().map(|(channel, _)| channel)
                }
                _ => None,
            }
        };
        let Some(old) = old else {
            return;
        };
        tracing::info!(channel = id, "publishing channel replaced after a nack");
        let owed = self.inner.settings.confirm_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(owed).await;
            let _ = old.close(200, "replaced after a nack".into()).await;
        });
    }
}

/// The least a replacement channel lives before a nack replaces it too.
const RENEW_AFTER: Duration = Duration::from_secs(1);

async fn open_session(settings: &AmqpSettings, name: &str) -> Result<Session, AmqpError> {
    let connection = connect::connect(settings, name).await?;
    let mut channels = Vec::with_capacity(settings.channels);
    for _ in 0..settings.channels.max(1) {
        channels.push(
            confirm_channel(&connection)
                .await
                .map_err(|err| AmqpError::Broker(err.to_string()))?,
        );
    }
    let replaced = channels.iter().map(|_| Mutex::new(None)).collect();
    let retired = channels.iter().map(|_| AtomicBool::new(false)).collect();
    Ok(Session {
        connection,
        channels,
        replaced,
        retired,
    })
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests;
