//! A delivery as the pipeline sees it: the sealed body and the few headers
//! it needs, read once from the AMQP properties.
//!
//! Keeping lapin's `Delivery` at the pool's edge lets every step be driven in
//! a test without a broker. Nothing here is trusted: a header that is
//! missing or of the wrong type is `None`, and the open step decides.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mailroom_core::job::Lane;
use mailroom_core::wire::{PERSISTENT, WorkQueue, headers};

/// One message taken from a work queue.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// AMQP `message_id`: the job id, as the producer wrote it.
    pub message_id: Option<String>,
    /// `mailroom-kid`: the key that sealed the body.
    pub kid: Option<String>,
    /// `mailroom-tenant`.
    pub tenant: Option<String>,
    /// The lane the job travels on (`mailroom-lane`; transactional if absent).
    pub lane: Lane,
    /// `mailroom-attempt`: this delivery's attempt, from 1.
    pub attempt: u32,
    /// `mailroom-replayed`: an operator replayed it from the dead letters.
    pub replayed: bool,
    /// A header mailroom reads that is there but does not read as one
    /// (an attempt that is no whole number from 1, an unknown lane): no
    /// producer of ours writes that, and guessing would reset a retry
    /// budget or send a job down the wrong lane.
    pub bad_header: Option<&'static str>,
    /// Times the broker handed this message out before (quorum queues'
    /// `x-delivery-count`), when it says.
    pub delivery_count: Option<i64>,
    /// The sealed body.
    pub body: Vec<u8>,
    /// The properties as received, kept to republish the message unchanged
    /// but for the headers a retry or dead letter adds.
    pub properties: BasicProperties,
}

impl Incoming {
    /// Reads the headers of a delivery.
    pub fn new(properties: BasicProperties, body: Vec<u8>) -> Self {
        let empty = FieldTable::default();
        let table = properties.headers().as_ref().unwrap_or(&empty);
        let present = |name| table.inner().contains_key(name);
        let lane = text(table, headers::LANE).and_then(|lane| lane.parse().ok());
        // A number may come as text from a client that writes only strings.
        let attempt = integer(table, headers::ATTEMPT)
            .or_else(|| text(table, headers::ATTEMPT)?.parse().ok())
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1);
        let bad_header = if present(headers::ATTEMPT) && attempt.is_none() {
            Some("the mailroom-attempt header is not a whole number from 1")
        } else if present(headers::LANE) && lane.is_none() {
            Some("the mailroom-lane header names no lane")
        } else {
            None
        };
        let (lane, attempt) = (lane.unwrap_or_default(), attempt.unwrap_or(1));
        Self {
            message_id: properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            kid: text(table, headers::KID),
            tenant: text(table, headers::TENANT),
            lane,
            attempt,
            replayed: matches!(
                table.inner().get(headers::REPLAYED),
                Some(AMQPValue::Boolean(true))
            ),
            bad_header,
            delivery_count: integer(table, "x-delivery-count"),
            body,
            properties,
        }
    }

    /// The work queue it belongs in, by lane and size: a republish (retry,
    /// replay) goes back there.
    pub fn queue(&self) -> WorkQueue {
        WorkQueue::of(self.lane, self.body.len())
    }

    /// The header table, empty if the message had none.
    pub fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// The properties to republish with: the received ones with `changes`
    /// applied to the headers. Broker-added headers (`x-delivery-count`,
    /// `x-death`, `x-first-death-*`) are dropped: they describe the old
    /// message's life and a retry tier would otherwise grow `x-death` forever.
    /// So is `mailroom-replayed` (unless `changes` sets it, as `dlq replay`
    /// does): an operator's replay may take a parked claim once, and a
    /// retry or defer of that replay, which may follow an uncertain send of
    /// its own, must not. So are `CC` and `BCC`: the broker routes by them,
    /// and a publisher's `CC` naming a work queue would send every dead
    /// letter back to work, for ever (a retry sets its own).
    ///
    /// Of the other properties only the message id, content type and
    /// timestamp are kept, and the copy is persistent: a publisher's
    /// `expiration` would drop a dead letter from its queue unseen, and its
    /// `user_id` would make the broker refuse the republish.
    pub fn republish_properties(&self, changes: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table: FieldTable = self
            .headers()
            .inner()
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                !name.starts_with("x-") && ![headers::REPLAYED, "CC", "BCC"].contains(&name)
            })
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        for (name, value) in changes {
            table.insert(ShortString::from(*name), value.clone());
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_headers(table);
        if let Some(id) = self.properties.message_id() {
            properties = properties.with_message_id(id.clone());
        }
        if let Some(content_type) = self.properties.content_type() {
            properties = properties.with_content_type(content_type.clone());
        }
        if let Some(timestamp) = self.properties.timestamp() {
            properties = properties.with_timestamp(*timestamp);
        }
        properties
    }
}

/// A header as text, accepting the string types clients write.
pub(crate) fn text(table: &FieldTable, name: &str) -> Option<String> {
    match table.inner().get(name)? {
        AMQPValue::LongString(value) => String::from_utf8(value.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

/// A header as an integer, accepting every integer type.
pub(crate) fn integer(table: &FieldTable, name: &str) -> Option<i64> {
    match table.inner().get(name)? {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// A header value holding `text`.
pub(crate) fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_headers(entries: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in entries {
            table.insert(ShortString::from(*name), value.clone());
        }
        BasicProperties::default()
            .with_headers(table)
            .with_message_id(ShortString::from("0190b7c4-0000-7000-8000-000000000001"))
    }

    #[test]
    fn reads_the_headers_it_needs() {
        let incoming = Incoming::new(
            with_headers(&[
                (headers::KID, long_string("k1")),
                (headers::TENANT, AMQPValue::ShortString("acme".into())),
                (headers::LANE, long_string("bulk")),
                (headers::ATTEMPT, AMQPValue::LongLongInt(3)),
                ("x-delivery-count", AMQPValue::LongInt(2)),
            ]),
            b"sealed".to_vec(),
        );
        assert_eq!(incoming.kid.as_deref(), Some("k1"));
        assert_eq!(incoming.tenant.as_deref(), Some("acme"));
        assert_eq!(incoming.lane, Lane::Bulk);
        assert_eq!(incoming.attempt, 3);
        assert_eq!(incoming.delivery_count, Some(2));
        assert_eq!(
            incoming.message_id.as_deref(),
            Some("0190b7c4-0000-7000-8000-000000000001")
        );
    }

    #[test]
    fn missing_or_odd_headers_fall_back_safely() {
        let incoming = Incoming::new(
            with_headers(&[
                (headers::ATTEMPT, AMQPValue::LongLongInt(-4)),
                (headers::LANE, long_string("carrier-pigeon")),
                (headers::KID, AMQPValue::Boolean(true)),
            ]),
            Vec::new(),
        );
        assert_eq!(incoming.attempt, 1);
        assert_eq!(incoming.lane, Lane::Transactional);
        assert_eq!(incoming.kid, None);
        assert_eq!(incoming.tenant, None);
        assert!(incoming.bad_header.is_some(), "and the job is refused");
    }

    #[test]
    fn only_a_header_that_is_there_and_wrong_is_bad() {
        let read = |entries: &[(&str, AMQPValue)]| Incoming::new(with_headers(entries), Vec::new());
        let missing = read(&[]);
        assert_eq!((missing.attempt, missing.lane), (1, Lane::Transactional));
        assert_eq!(missing.bad_header, None);
        let as_text = read(&[(headers::ATTEMPT, long_string("3"))]);
        assert_eq!((as_text.attempt, as_text.bad_header), (3, None));
        for attempt in [
            long_string("abc"),
            AMQPValue::LongLongInt(0),
            AMQPValue::LongLongInt(-5),
            AMQPValue::LongLongInt(1 << 40),
            AMQPValue::Boolean(true),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(2)].into()),
        ] {
            let odd = read(&[(headers::ATTEMPT, attempt.clone())]);
            assert_eq!(
                odd.bad_header,
                Some("the mailroom-attempt header is not a whole number from 1"),
                "{attempt:?}"
            );
        }
        let lane = read(&[(headers::LANE, AMQPValue::LongInt(1))]);
        assert_eq!(
            lane.bad_header,
            Some("the mailroom-lane header names no lane")
        );
    }

    #[test]
    fn republishing_replaces_headers_and_drops_broker_ones() {
        let incoming = Incoming::new(
            with_headers(&[
                (headers::ATTEMPT, AMQPValue::LongLongInt(1)),
                (headers::KID, long_string("k1")),
                ("x-death", AMQPValue::Void),
            ]),
            Vec::new(),
        );
        let properties =
            incoming.republish_properties(&[(headers::ATTEMPT, AMQPValue::LongLongInt(2))]);
        let table = properties.headers().clone().unwrap_or_default();
        assert_eq!(integer(&table, headers::ATTEMPT), Some(2));
        assert_eq!(text(&table, headers::KID).as_deref(), Some("k1"));
        assert!(!table.inner().contains_key("x-death"));
        assert_eq!(properties.message_id(), incoming.properties.message_id());
    }

    #[test]
    fn a_publishers_routing_and_expiry_do_not_follow_a_republish() {
        let properties = with_headers(&[(
            headers::CC,
            AMQPValue::FieldArray(vec![long_string("mailroom.send.transactional")].into()),
        )])
        .with_expiration(ShortString::from("3000"))
        .with_user_id(ShortString::from("someone"))
        .with_delivery_mode(1);
        let incoming = Incoming::new(properties, Vec::new());
        let republished = incoming.republish_properties(&[]);
        let table = republished.headers().clone().unwrap_or_default();
        assert!(!table.inner().contains_key(headers::CC));
        assert_eq!(republished.expiration(), &None);
        assert_eq!(republished.user_id(), &None);
        assert_eq!(republished.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(republished.message_id(), incoming.properties.message_id());
    }

    #[test]
    fn only_the_replay_itself_is_marked_replayed() {
        let replayed = Incoming::new(
            with_headers(&[(headers::REPLAYED, AMQPValue::Boolean(true))]),
            Vec::new(),
        );
        assert!(replayed.replayed);
        let retried =
            replayed.republish_properties(&[(headers::ATTEMPT, AMQPValue::LongLongInt(2))]);
        assert!(!Incoming::new(retried, Vec::new()).replayed);
        let again = replayed.republish_properties(&[(headers::REPLAYED, AMQPValue::Boolean(true))]);
        assert!(Incoming::new(again, Vec::new()).replayed);
    }
}
