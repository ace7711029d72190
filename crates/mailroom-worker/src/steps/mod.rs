//! The pipeline's steps, one module a step, in the order they run (see
//! [`crate::pipeline`]).

pub mod check;
pub mod dedup;
pub mod late_marks;
pub mod open;
pub mod outcome;
pub mod send;

#[cfg(test)]
pub(crate) mod tests {
    //! Jobs and deliveries for the steps' unit tests.

    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use mailroom_core::job::{EmailMessage, JobRequest, SendJob};
    use mailroom_core::seal::Keyring;
    use mailroom_core::wire::headers;

    use crate::incoming::{Incoming, long_string};

    /// A valid job.
    pub fn sample_job() -> SendJob {
        SendJob::from_request(
            JobRequest {
                tenant: None,
                idempotency_key: Some("order-1".to_owned()),
                lane: mailroom_core::job::Lane::Transactional,
                expires_at: None,
                message: EmailMessage {
                    from: "Shop <shop@example.com>".to_owned(),
                    to: vec!["ada@example.org".to_owned()],
                    subject: "Receipt".to_owned(),
                    text: Some("Thanks".to_owned()),
                    ..EmailMessage::default()
                },
            },
            "acme",
        )
    }

    /// `job` sealed under `keyring`, as a worker receives it.
    pub fn incoming_for(keyring: &Keyring, job: &SendJob) -> Incoming {
        let sealed = keyring.seal(job).expect("seal");
        let mut table = FieldTable::default();
        table.insert(ShortString::from(headers::KID), long_string(&sealed.kid));
        table.insert(ShortString::from(headers::TENANT), long_string(&job.tenant));
        table.insert(
            ShortString::from(headers::ATTEMPT),
            AMQPValue::LongLongInt(1),
        );
        let properties = BasicProperties::default()
            .with_headers(table)
            .with_message_id(ShortString::from(job.id.to_string()));
        Incoming::new(properties, sealed.body)
    }
}
