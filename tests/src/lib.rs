//! Fixtures shared by mailroom's tests against real services: each test
//! gets its own RabbitMQ vhost ([`rabbit`]) and Redis key prefix
//! ([`redis`]), so tests run in parallel and leave nothing behind; [`smtp`]
//! starts a real SMTP server (aiosmtpd) per test, and [`stack`] joins them.
//!
//! A service that is down is a loud failure naming the command that
//! starts it, never a silent skip.

pub mod logs;
pub mod rabbit;
pub mod redis;
pub mod smtp;
pub mod stack;

/// A job of tenant `acme` from the shop to `to`, with a text body.
pub fn job(to: &str, subject: &str, text: &str) -> mailroom_core::job::SendJob {
    use mailroom_core::job::{EmailMessage, JobRequest, SendJob};
    SendJob::from_request(
        JobRequest {
            message: EmailMessage {
                from: "Shop <shop@example.com>".to_owned(),
                to: vec![to.to_owned()],
                subject: subject.to_owned(),
                text: Some(text.to_owned()),
                ..EmailMessage::default()
            },
            ..JobRequest::default()
        },
        "acme",
    )
}

/// A name unique to this test run, safe in vhost names and Redis keys.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}
