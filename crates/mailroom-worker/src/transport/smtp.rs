//! The `smtp` transport: a pool of lettre `AsyncSmtpConnection`s to one
//! relay.
//!
//! lettre's pooled `AsyncSmtpTransport` reports a failure without saying
//! at which step it happened; mailroom needs to know, because a connection
//! lost after the end of DATA is *uncertain* (the relay may have taken the
//! message) while one lost before it is plainly transient. So the MAIL,
//! RCPT, DATA steps are driven here, over lettre's connection type, with a
//! timeout on each command.
//!
//! **Handing over a busy connection.** With all of the pool's connections
//! in use, a delivery waits in a queue with its envelope. The holder of a
//! connection about to end its own DATA writes the first waiter's MAIL,
//! RCPT and DATA in the same write as its end of DATA (RFC 2920 lets
//! message content begin a group), reads its own reply, and hands the
//! connection over; the waiter reads its replies and goes on. Back to back,
//! each message then costs one write and one read on each side instead of
//! two. A holder whose connection fails drops the waiter, which then waits
//! for a connection of its own: its commands had no body, so nothing of it
//! was delivered.
//!
//! TLS: `starttls-required` (default) refuses a relay that does not offer
//! STARTTLS; `implicit` speaks TLS from the first byte; `opportunistic`
//! upgrades when offered; `none` is allowed only to a loopback host unless
//! `smtp.allow_plaintext` is set. Certificates are checked against the
//! system's roots and `smtp.ca_file`.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use mailroom_core::settings::{SmtpSettings, TlsMode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::data::{crlf_breaks, data_section};
use super::{Delivered, HandOver, SendError, TransportError, Withheld};
use crate::message::OutgoingMessage;

/// An idle connection older than this is closed rather than reused: relays
/// drop idle clients after a while, and a stale one costs a round trip.
const MAX_IDLE: Duration = Duration::from_secs(30);

/// How long a failed session is given to answer QUIT before it is closed.
const QUIT_WAIT: Duration = Duration::from_secs(1);

/// Largest DATA section a waiter's commands are written after: the saving
/// is a system call or two, which only small messages notice, and the
/// combined write copies the section.
const HAND_OVER_MAX: usize = 64 * 1024;

/// Where and how to reach the relay.
struct Relay {
    host: String,
    port: u16,
    tls: TlsMode,
    tls_parameters: Option<TlsParameters>,
    /// `smtp.allow_plaintext`, or the relay is on this host.
    plaintext_allowed: bool,
    hello: ClientId,
    credentials: Option<Credentials>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

/// A connection and what its relay offers.
struct Session {
    smtp: AsyncSmtpConnection,
    /// RFC 2920: MAIL, RCPT and DATA go out in one write.
    pipelining: bool,
}

struct Idle {
    session: Session,
    since: Instant,
}

/// A pool of connections to one SMTP relay.
pub struct SmtpTransport {
    relay: Relay,
    idle: Mutex<Vec<Idle>>,
    permits: Arc<Semaphore>,
    pool_size: usize,
    waiters: Mutex<VecDeque<Waiter>>,
    waiter_ids: AtomicU64,
}

/// A delivery waiting for a connection, whose MAIL, RCPT and DATA the
/// holder of a busy one may write after its own end of DATA.
struct Waiter {
    id: u64,
    envelope: Envelope,
    eight_bit: bool,
    handed: oneshot::Sender<Handed>,
}

impl Waiter {
    /// Gives the waiter `session`, its commands written, and the pool
    /// permit that goes with it.
    fn hand(self, session: Session, permit: OwnedSemaphorePermit) {
        // If the waiter is gone, its DATA open on the relay, the connection
        // comes back and is dropped: closed without a body, it delivers
        // nothing.
        let _ = self.handed.send(Handed { session, permit });
    }
}

/// A connection handed over with the receiver's MAIL, RCPT and DATA
/// written, and the pool permit that goes with it.
struct Handed {
    session: Session,
    permit: OwnedSemaphorePermit,
}

/// A waiter's place in the queue, given up when dropped.
struct Queued<'a> {
    transport: &'a SmtpTransport,
    id: u64,
    /// Known to be out of the queue already: nothing to look for.
    out: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.out {
            self.transport.leave_queue(self.id);
        }
    }
}

/// How a delivery came by the right to a connection.
enum Obtained {
    /// A permit: take an idle connection or open one.
    Permit(OwnedSemaphorePermit),
    /// A busy connection, handed over (boxed: a session is large).
    Handed(Box<Handed>),
}

/// Whether a transaction's MAIL, RCPT and DATA are still to be written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opening {
    ToWrite,
    Written,
}

/// How a transaction ended, and the waiter whose commands followed its end
/// of DATA, to be handed the connection (only when it is still in step).
struct Ended {
    result: Result<Response, (Step, Failure)>,
    next: Option<Waiter>,
}

impl Ended {
    fn failed(step: Step, failure: Failure) -> Self {
        Self {
            result: Err((step, failure)),
            next: None,
        }
    }
}

/// A message as an SMTP transaction writes it, made once before a
/// connection is taken, so a retry over a fresh connection does not make
/// it again (for a 10 MiB message that is a pass over every byte).
pub struct SmtpMessage {
    envelope: Envelope,
    /// Not 7-bit: needs 8BITMIME.
    eight_bit: bool,
    body: DataBody,
}

enum DataBody {
    /// The DATA section, dots doubled and end included: one write.
    Section(String),
    /// Not UTF-8: CRLF breaks only, for lettre, which doubles the dots.
    Lettre(Vec<u8>),
}

impl SmtpMessage {
    /// `message` as DATA carries it.
    pub fn new(message: OutgoingMessage) -> Self {
        let eight_bit = !message.raw.is_ascii();
        let body = match data_section(&message.raw) {
            Some(section) => DataBody::Section(section),
            None => DataBody::Lettre(crlf_breaks(&message.raw)),
        };
        Self {
            envelope: message.envelope,
            eight_bit,
            body,
        }
    }
}

/// Which step a failure happened at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Before the message was handed over.
    Before,
    /// After the end of DATA was written, waiting for the reply.
    AfterData,
}

impl SmtpTransport {
    /// A pool for the relay `settings` name.
    pub fn new(settings: &SmtpSettings) -> Result<Self, TransportError> {
        let (host, port) = host_and_port(settings.url.expose(), settings.tls)?;
        let mut tls = settings.tls;
        if settings.url.expose().starts_with("smtps://") {
            tls = TlsMode::Implicit;
        }
        let plaintext_allowed = settings.allow_plaintext || is_loopback(&host);
        if tls == TlsMode::None && !plaintext_allowed {
            return Err(TransportError::PlaintextRefused { host });
        }
        let tls_parameters = match tls {
            TlsMode::None => None,
            _ => Some(tls_parameters(&host, settings)?),
        };
        let hello = settings
            .hello_name
            .clone()
            .map_or_else(ClientId::default, ClientId::Domain);
        let credentials = settings
            .username
            .as_ref()
            .map(|user| Credentials::new(user.clone(), settings.password.expose().to_owned()));
        let pool_size = usize::try_from(settings.pool_size).unwrap_or(1).max(1);
        Ok(Self {
            relay: Relay {
                host,
                port,
                tls,
                tls_parameters,
                plaintext_allowed,
                hello,
                credentials,
                connect_timeout: settings.connect_timeout,
                command_timeout: settings.command_timeout,
            },
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(pool_size)),
            pool_size,
            waiters: Mutex::new(VecDeque::new()),
            waiter_ids: AtomicU64::new(0),
        })
    }

    /// One line for the start-up log; no credentials.
    pub fn describe(&self) -> String {
        format!(
            "smtp transport: relay {}:{} (tls {}{}, pool {})",
            self.relay.host,
            self.relay.port,
            self.relay.tls.as_str(),
            if self.relay.credentials.is_some() {
                ", AUTH"
            } else {
                ""
            },
            self.pool_size
        )
    }

    /// Sends `message` over a pooled connection, awaiting `hand_over`
    /// before the end of DATA.
    pub async fn send(
        &self,
        message: &SmtpMessage,
        mut hand_over: Option<HandOver<'_>>,
    ) -> Result<Delivered, SendError> {
        let (reused, permit, opening) = match self.obtain(message).await? {
            Obtained::Handed(handed) => {
                let Handed { session, permit } = *handed;
                (Some(session), permit, Opening::Written)
            }
            Obtained::Permit(permit) => (self.take_idle(), permit, Opening::ToWrite),
        };
        if let Some(mut session) = reused {
            let ended = self
                .transact(&mut session, message, &mut hand_over, opening)
                .await;
            match ended {
                // A reused connection the relay dropped (while idle, or as
                // it was handed over) fails before the message with a
                // network error: nothing was sent, so try once more on a
                // fresh connection instead of spending an attempt.
                Ended {
                    result: Err((Step::Before, err)),
                    next: None,
                } if err.is_network() => abort(&mut session.smtp).await,
                ended => return self.settle(session, permit, ended).await,
            }
        }
        let mut session = self.connect().await?;
        let ended = self
            .transact(&mut session, message, &mut hand_over, Opening::ToWrite)
            .await;
        self.settle(session, permit, ended).await
    }

    /// What follows a transaction: the connection goes to the waiter whose
    /// commands followed our end of DATA, or back to the pool, or (after a
    /// failure that may have left it out of step) is closed.
    async fn settle(
        &self,
        mut session: Session,
        permit: OwnedSemaphorePermit,
        ended: Ended,
    ) -> Result<Delivered, SendError> {
        let Ended { result, next } = ended;
        if let Some(next) = next {
            next.hand(session, permit);
            return result
                .map(|response| delivered(&response))
                .map_err(|(step, err)| err.into_send_error(step));
        }
        match result {
            Ok(response) => Ok(self.keep(session, &response)),
            Err((step, err)) => {
                abort(&mut session.smtp).await;
                Err(err.into_send_error(step))
            }
        }
    }

    /// A permit to use a connection, or a busy connection handed over with
    /// our commands written. Waits in the hand-over queue only while every
    /// permit is taken.
    async fn obtain(&self, message: &SmtpMessage) -> Result<Obtained, SendError> {
        let closed = |_| SendError::transient(None, "transport shut down");
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(Obtained::Permit(permit));
        }
        let (handed, mut receiver) = oneshot::channel();
        let id = self.waiter_ids.fetch_add(1, Ordering::Relaxed);
        self.lock_waiters().push_back(Waiter {
            id,
            envelope: message.envelope.clone(),
            eight_bit: message.eight_bit,
            handed,
        });
        // A send dropped while it waits leaves the queue with it (a relay
        // without PIPELINING never takes waiters from it).
        let mut queued = Queued {
            transport: self,
            id,
            out: false,
        };
        tokio::select! {
            biased;
            handed = &mut receiver => {
                // Handed over or dropped, our waiter left the queue with
                // the holder that took it.
                queued.out = true;
                if let Ok(handed) = handed {
                    return Ok(Obtained::Handed(Box::new(handed)));
                }
            }
            permit = Arc::clone(&self.permits).acquire_owned() => {
                let permit = permit.map_err(closed);
                queued.out = true;
                if self.leave_queue(id) {
                    return permit.map(Obtained::Permit);
                }
                // A holder took us from the queue and wrote our commands:
                // its connection comes once it has its own reply.
                drop(permit);
                if let Ok(handed) = receiver.await {
                    return Ok(Obtained::Handed(Box::new(handed)));
                }
            }
        }
        // The holder's connection failed after it took us: wait like anyone.
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map(Obtained::Permit)
            .map_err(closed)
    }

    /// The first waiter whose commands this connection can carry, with
    /// those commands; waiters that gave up are dropped on the way.
    fn next_waiter(&self, connection: &AsyncSmtpConnection) -> Option<(Waiter, String)> {
        let mut waiters = self.lock_waiters();
        while let Some(waiter) = waiters.pop_front() {
            if waiter.handed.is_closed() {
                continue;
            }
            let Ok(group) = opening_group(connection, &waiter.envelope, waiter.eight_bit) else {
                // It needs an extension this relay lacks: it fails on a
                // connection of its own, with its own error.
                waiters.push_front(waiter);
                return None;
            };
            return Some((waiter, group));
        }
        None
    }

    /// Takes waiter `id` out of the queue; `false` if a holder took it.
    fn leave_queue(&self, id: u64) -> bool {
        let mut waiters = self.lock_waiters();
        let at = waiters.iter().position(|waiter| waiter.id == id);
        at.and_then(|at| waiters.remove(at)).is_some()
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiter>> {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends QUIT on every idle connection, all at once, each given
    /// [`QUIT_WAIT`] to answer.
    pub async fn shutdown(&self) {
        self.permits.close();
        let idle: Vec<Idle> = self.lock_idle().drain(..).collect();
        futures_util::future::join_all(idle.into_iter().map(|mut idle| async move {
            let _ = tokio::time::timeout(QUIT_WAIT, idle.session.smtp.quit()).await;
        }))
        .await;
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take_idle(&self) -> Option<Session> {
        let mut idle = self.lock_idle();
        while let Some(candidate) = idle.pop() {
            if candidate.since.elapsed() < MAX_IDLE && !candidate.session.smtp.has_broken() {
                return Some(candidate.session);
            }
        }
        None
    }

    fn keep(&self, session: Session, response: &Response) -> Delivered {
        let mut idle = self.lock_idle();
        if idle.len() < self.pool_size {
            idle.push(Idle {
                session,
                since: Instant::now(),
            });
        }
        delivered(response)
    }

    /// Connects, greets, upgrades to TLS and authenticates, within
    /// `smtp.connect_timeout`.
    async fn connect(&self) -> Result<Session, SendError> {
        let relay = &self.relay;
        let connecting = async {
            let mut connection = if let (TlsMode::Implicit, Some(parameters)) =
                (relay.tls, relay.tls_parameters.clone())
            {
                AsyncSmtpConnection::connect_tokio1(
                    (relay.host.as_str(), relay.port),
                    Some(relay.connect_timeout),
                    &relay.hello,
                    Some(parameters),
                    None,
                )
                .await
                .map_err(|err| connect_error("connecting", &err))?
            } else {
                let tcp = tokio::net::TcpStream::connect((relay.host.as_str(), relay.port))
                    .await
                    .map_err(|err| SendError::transient(None, &format!("connecting: {err}")))?;
                // The end of DATA is a small write right after the body:
                // with Nagle on, it waits for the relay's delayed ACK
                // (~40 ms a message).
                tcp.set_nodelay(true)
                    .map_err(|err| SendError::transient(None, &format!("connecting: {err}")))?;
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &relay.hello)
                    .await
                    .map_err(|err| connect_error("greeting", &err))?
            };
            let upgrade = match relay.tls {
                TlsMode::StarttlsRequired => {
                    if !connection.can_starttls() {
                        abort(&mut connection).await;
                        return Err(SendError::transient(
                            None,
                            "the relay does not offer STARTTLS and smtp.tls is starttls-required",
                        ));
                    }
                    true
                }
                TlsMode::Opportunistic => connection.can_starttls(),
                TlsMode::Implicit | TlsMode::None => false,
            };
            if upgrade && let Some(parameters) = relay.tls_parameters.clone() {
                connection
                    .starttls(parameters, &relay.hello)
                    .await
                    .map_err(|err| connect_error("STARTTLS", &err))?;
            }
            if let Some(credentials) = &relay.credentials {
                // With `opportunistic`, a relay that does not offer STARTTLS
                // may be an attacker who struck it from the EHLO reply:
                // the password goes in clear only where plaintext is
                // allowed.
                if !connection.is_encrypted() && !relay.plaintext_allowed {
                    abort(&mut connection).await;
                    return Err(SendError::transient(
                        None,
                        "the relay did not offer STARTTLS: AUTH is not sent in clear to a host \
                         that is not loopback unless smtp.allow_plaintext = true",
                    ));
                }
                // A refused login is the operator's to fix, not the
                // message's fault: transient, so nothing is dead-lettered
                // for a wrong password.
                connection
                    .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                    .await
                    .map_err(|err| {
                        SendError::transient(err.status().map(u16::from), &format!("AUTH: {err}"))
                    })?;
            }
            // lettre keeps only the EHLO keywords it knows; ask again to
            // learn whether the relay takes pipelined commands.
            let ehlo = connection
                .command(Ehlo::new(relay.hello.clone()))
                .await
                .map_err(|err| connect_error("EHLO", &err))?;
            let pipelining = ehlo
                .message()
                .any(|line| line.trim().eq_ignore_ascii_case("PIPELINING"));
            Ok(Session {
                smtp: connection,
                pipelining,
            })
        };
        tokio::time::timeout(relay.connect_timeout, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(SendError::transient(
                    None,
                    &format!(
                        "no SMTP session within smtp.connect_timeout ({:?})",
                        relay.connect_timeout
                    ),
                ))
            })
    }

    /// MAIL, RCPT for each recipient, DATA (in one write when the relay
    /// pipelines; already written when `opening` says so), then the
    /// message, followed by a waiter's commands when one is queued; each
    /// reply within `smtp.command_timeout`.
    async fn transact(
        &self,
        session: &mut Session,
        message: &SmtpMessage,
        hand_over: &mut Option<HandOver<'_>>,
        opening: Opening,
    ) -> Ended {
        if let Err(failure) = self.open(session, message, opening).await {
            return Ended::failed(Step::Before, failure);
        }
        if let Some(hand_over) = hand_over.take() {
            // Nothing was handed over yet: the aborted session drops the
            // partial message, and the retry is safe.
            if let Err(why) = hand_over.await {
                return Ended::failed(Step::Before, Failure::Withheld(why));
            }
        }
        let connection = &mut session.smtp;
        let after = |failure| (Step::AfterData, failure);
        match &message.body {
            DataBody::Section(data) => {
                let next = (session.pipelining && data.len() <= HAND_OVER_MAX)
                    .then(|| self.next_waiter(connection))
                    .flatten();
                let Some((waiter, group)) = next else {
                    return Ended {
                        result: self.command(connection, data).await.map_err(after),
                        next: None,
                    };
                };
                let result = self.command(connection, format!("{data}{group}")).await;
                // A reply, good or bad, leaves the connection in step for
                // the waiter; no reply (a network error or timeout) leaves
                // the waiter to wait for another connection.
                let in_step = match &result {
                    Ok(_) => true,
                    Err(Failure::Smtp(err)) => err.status().is_some(),
                    Err(_) => false,
                };
                Ended {
                    result: result.map_err(after),
                    next: in_step.then_some(waiter),
                }
            }
            DataBody::Lettre(raw) => Ended {
                result: tokio::time::timeout(self.relay.command_timeout, connection.message(raw))
                    .await
                    .map_err(|_| after(Failure::Timeout(self.relay.command_timeout)))
                    .and_then(|sent| sent.map_err(|err| after(Failure::Smtp(err)))),
                next: None,
            },
        }
    }

    /// Writes (unless `opening` says they were written) and reads MAIL,
    /// RCPT for each recipient and DATA.
    async fn open(
        &self,
        session: &mut Session,
        message: &SmtpMessage,
        opening: Opening,
    ) -> Result<(), Failure> {
        let connection = &mut session.smtp;
        // One reply for MAIL, one a recipient, one for DATA. A refusal ends
        // the session (it is aborted), so no body follows a DATA that a
        // refused RCPT made fail.
        let replies = message.envelope.to().len() + 2;
        if opening == Opening::Written {
            for _ in 0..replies {
                self.reply(connection).await?;
            }
            return Ok(());
        }
        if session.pipelining {
            let group = opening_group(connection, &message.envelope, message.eight_bit)?;
            self.command(connection, group).await?;
            for _ in 1..replies {
                self.reply(connection).await?;
            }
            return Ok(());
        }
        let (mail, rcpts) = envelope_commands(connection, &message.envelope, message.eight_bit)?;
        self.command(connection, mail).await?;
        for rcpt in rcpts {
            self.command(connection, rcpt).await?;
        }
        self.command(connection, Data).await?;
        Ok(())
    }

    async fn reply(&self, connection: &mut AsyncSmtpConnection) -> Result<Response, Failure> {
        tokio::time::timeout(self.relay.command_timeout, connection.read_response())
            .await
            .map_err(|_| Failure::Timeout(self.relay.command_timeout))?
            .map_err(Failure::Smtp)
    }

    async fn command<C: std::fmt::Display>(
        &self,
        connection: &mut AsyncSmtpConnection,
        command: C,
    ) -> Result<Response, Failure> {
        tokio::time::timeout(self.relay.command_timeout, connection.command(command))
            .await
            .map_err(|_| Failure::Timeout(self.relay.command_timeout))?
            .map_err(Failure::Smtp)
    }
}

/// What went wrong in a transaction.
enum Failure {
    /// lettre's error: a reply code, or a connection problem.
    Smtp(lettre::transport::smtp::Error),
    /// No reply within the command timeout.
    Timeout(Duration),
    /// The message needs an extension the relay lacks.
    Unsupported(&'static str),
    /// The hand-over hook stopped the send.
    Withheld(Withheld),
}

impl Failure {
    fn is_network(&self) -> bool {
        match self {
            Self::Smtp(err) => err.status().is_none() && !err.is_client(),
            Self::Timeout(_) | Self::Unsupported(_) | Self::Withheld(_) => false,
        }
    }

    fn into_send_error(self, step: Step) -> SendError {
        match self {
            Self::Smtp(err) => match err.status().map(u16::from) {
                Some(code) if (500..600).contains(&code) => {
                    SendError::permanent(code, &err.to_string())
                }
                Some(code) => SendError::transient(Some(code), &err.to_string()),
                None if step == Step::AfterData => SendError::uncertain(&format!(
                    "connection lost after the end of DATA, before the reply: {err}"
                )),
                None => SendError::transient(None, &err.to_string()),
            },
            Self::Timeout(timeout) if step == Step::AfterData => SendError::uncertain(&format!(
                "no reply to the end of DATA within smtp.command_timeout ({timeout:?})"
            )),
            Self::Timeout(timeout) => SendError::transient(
                None,
                &format!("no reply within smtp.command_timeout ({timeout:?})"),
            ),
            Self::Unsupported(what) => SendError::permanent(555, what),
            Self::Withheld(why) => SendError::Withheld(why),
        }
    }
}

/// Ends a session after a failure: QUIT, then close. lettre waits for the
/// answer to QUIT without a limit, and a relay that stopped answering (the
/// usual reason to be here) would hold the job, and its claim, forever.
async fn abort(connection: &mut AsyncSmtpConnection) {
    if tokio::time::timeout(QUIT_WAIT, connection.abort())
        .await
        .is_err()
    {
        tracing::debug!("the relay did not answer QUIT: connection dropped");
    }
}

/// The relay's answer as a delivery.
fn delivered(response: &Response) -> Delivered {
    Delivered {
        code: u16::from(response.code()),
    }
}

/// MAIL, RCPT for each recipient and DATA, as one pipelined group.
fn opening_group(
    connection: &AsyncSmtpConnection,
    envelope: &Envelope,
    eight_bit: bool,
) -> Result<String, Failure> {
    let (mail, rcpts) = envelope_commands(connection, envelope, eight_bit)?;
    let mut group = mail.to_string();
    for rcpt in rcpts {
        group.push_str(&rcpt.to_string());
    }
    group.push_str(&Data.to_string());
    Ok(group)
}

/// MAIL, with the parameters the message needs on this connection, and
/// RCPT for each recipient.
fn envelope_commands(
    connection: &AsyncSmtpConnection,
    envelope: &Envelope,
    eight_bit: bool,
) -> Result<(Mail, Vec<Rcpt>), Failure> {
    let parameters = mail_parameters(connection, envelope, eight_bit)?;
    let rcpts = envelope
        .to()
        .iter()
        .map(|recipient| Rcpt::new(recipient.clone(), Vec::new()))
        .collect();
    Ok((Mail::new(envelope.from().cloned(), parameters), rcpts))
}

/// MAIL parameters the message needs (as lettre's own `send` picks them).
fn mail_parameters(
    connection: &AsyncSmtpConnection,
    envelope: &Envelope,
    eight_bit: bool,
) -> Result<Vec<MailParameter>, Failure> {
    let mut parameters = Vec::new();
    let info = connection.server_info();
    let non_ascii = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .any(|address| !AsRef::<str>::as_ref(address).is_ascii());
    if non_ascii {
        if !info.supports_feature(Extension::SmtpUtfEight) {
            return Err(Failure::Unsupported(
                "an address is not ASCII and the relay lacks SMTPUTF8",
            ));
        }
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if eight_bit {
        if !info.supports_feature(Extension::EightBitMime) {
            return Err(Failure::Unsupported(
                "the message is not 7-bit and the relay lacks 8BITMIME",
            ));
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    Ok(parameters)
}

fn connect_error(step: &str, err: &lettre::transport::smtp::Error) -> SendError {
    SendError::transient(err.status().map(u16::from), &format!("{step}: {err}"))
}

fn tls_parameters(host: &str, settings: &SmtpSettings) -> Result<TlsParameters, TransportError> {
    let mut builder = TlsParameters::builder(host.to_owned());
    if let Some(path) = &settings.ca_file {
        let ca_error = |reason: String| TransportError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
        let certificate = Certificate::from_pem(&pem).map_err(|err| ca_error(err.to_string()))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder
        .build_rustls()
        .map_err(|err| TransportError::Tls(err.to_string()))
}

/// `host` and `port` of `smtp://host[:port]` or `smtps://host[:port]`;
/// the port defaults to 465 for implicit TLS, 587 otherwise.
fn host_and_port(url: &str, tls: TlsMode) -> Result<(String, u16), TransportError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| TransportError::Url("expected smtp://host:port".to_owned()))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(TransportError::Url(
            "credentials go in smtp.username and smtp.password, not the URL".to_owned(),
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse()
                .map_err(|_| TransportError::Url(format!("port {port:?} is not a number")))?;
            (host, Some(port))
        }
        _ => (authority, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(TransportError::Url("no host".to_owned()));
    }
    let implicit = scheme == "smtps" || tls == TlsMode::Implicit;
    Ok((
        host.to_owned(),
        port.unwrap_or(if implicit { 465 } else { 587 }),
    ))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use mailroom_core::settings::Secret;

    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        let hp = |url, tls| host_and_port(url, tls).expect("parses");
        assert_eq!(
            hp("smtp://relay:2525", TlsMode::None),
            ("relay".to_owned(), 2525)
        );
        assert_eq!(hp("smtp://relay", TlsMode::StarttlsRequired).1, 587);
        assert_eq!(hp("smtps://relay", TlsMode::StarttlsRequired).1, 465);
        assert_eq!(hp("smtp://[::1]:25", TlsMode::None), ("::1".to_owned(), 25));
        assert!(host_and_port("smtp://u:p@relay:25", TlsMode::None).is_err());
        assert!(host_and_port("smtp://relay:x", TlsMode::None).is_err());
    }

    #[test]
    fn plaintext_is_refused_off_loopback() {
        let settings = |url: &str, allow| SmtpSettings {
            url: Secret::new(url),
            tls: TlsMode::None,
            allow_plaintext: allow,
            ..SmtpSettings::default()
        };
        assert!(matches!(
            SmtpTransport::new(&settings("smtp://relay.example:25", false)),
            Err(TransportError::PlaintextRefused { .. })
        ));
        assert!(SmtpTransport::new(&settings("smtp://relay.example:25", true)).is_ok());
        assert!(SmtpTransport::new(&settings("smtp://127.0.0.1:25", false)).is_ok());
        assert!(SmtpTransport::new(&settings("smtp://localhost:25", false)).is_ok());
    }

    /// A send that gives up while it waits for a connection (its future
    /// dropped) takes its place in the hand-over queue with it.
    #[tokio::test]
    async fn a_dropped_wait_leaves_the_queue() {
        let transport = SmtpTransport::new(&SmtpSettings {
            url: Secret::new("smtp://127.0.0.1:25"),
            tls: TlsMode::None,
            pool_size: 1,
            ..SmtpSettings::default()
        })
        .expect("transport");
        let message = one_message();
        let _busy = Arc::clone(&transport.permits)
            .try_acquire_owned()
            .expect("the only permit");
        let waited = tokio::time::timeout(Duration::from_millis(20), transport.obtain(&message));
        assert!(waited.await.is_err(), "no connection was free");
        assert!(transport.lock_waiters().is_empty());
    }

    /// A relay on 127.0.0.1 that never offers STARTTLS and takes any
    /// login; it answers until QUIT or the client leaves, and returns the
    /// lines it read.
    async fn relay_without_starttls() -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let serving = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let mut seen = Vec::new();
            write
                .write_all(b"220 relay ESMTP\r\n")
                .await
                .expect("greet");
            let mut in_data = false;
            while let Ok(Some(line)) = lines.next_line().await {
                let verb = line
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                seen.push(line.clone());
                let reply: &[u8] = match verb.as_str() {
                    _ if in_data && line != "." => continue,
                    _ if in_data => {
                        in_data = false;
                        b"250 queued\r\n"
                    }
                    "EHLO" => b"250-relay\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n",
                    "AUTH" => b"235 ok\r\n",
                    "DATA" => {
                        in_data = true;
                        b"354 go on\r\n"
                    }
                    "QUIT" => {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        break;
                    }
                    _ => b"250 ok\r\n",
                };
                if write.write_all(reply).await.is_err() {
                    break;
                }
            }
            seen
        });
        (port, serving)
    }

    fn one_message() -> SmtpMessage {
        let address: lettre::Address = "ada@example.org".parse().expect("address");
        SmtpMessage::new(OutgoingMessage {
            envelope: Envelope::new(Some(address.clone()), vec![address]).expect("envelope"),
            message_id: "<1@example.org>".to_owned(),
            raw: b"Subject: hi\r\n\r\nhello\r\n".to_vec(),
        })
    }

    /// `opportunistic` TLS with a login, to a relay whose EHLO lacks
    /// STARTTLS (as if an attacker had struck it): the password is not
    /// sent unless plaintext is allowed.
    #[tokio::test]
    async fn credentials_never_go_in_clear_off_loopback() {
        for allow_plaintext in [false, true] {
            let (port, relay) = relay_without_starttls().await;
            let transport = SmtpTransport::new(&SmtpSettings {
                // Reaches the relay on 127.0.0.1 (Linux takes 0.0.0.0 as
                // this host) under a name that is not loopback.
                url: Secret::new(format!("smtp://0.0.0.0:{port}")),
                tls: TlsMode::Opportunistic,
                allow_plaintext,
                username: Some("mailer".to_owned()),
                password: Secret::new("s3cret-pass"),
                ..SmtpSettings::default()
            })
            .expect("transport");
            let sent = transport.send(&one_message(), None).await;
            transport.shutdown().await;
            let seen = relay.await.expect("relay");
            let authed = seen.iter().any(|line| line.starts_with("AUTH"));
            if allow_plaintext {
                assert_eq!(sent, Ok(Delivered { code: 250 }));
                assert!(authed, "{seen:?}");
            } else {
                match sent {
                    Err(SendError::Transient { detail, .. }) => {
                        assert!(detail.contains("STARTTLS"), "{detail}");
                        assert!(!detail.contains("s3cret"), "{detail}");
                    }
                    other => panic!("expected a transient error, got {other:?}"),
                }
                assert!(!authed, "AUTH went in clear: {seen:?}");
                assert!(!seen.iter().any(|line| line.starts_with("MAIL")));
            }
        }
    }

    #[test]
    fn codes_pick_the_way() {
        let timeout = Failure::Timeout(Duration::from_secs(1));
        assert!(matches!(
            timeout.into_send_error(Step::AfterData),
            SendError::Uncertain { .. }
        ));
        let timeout = Failure::Timeout(Duration::from_secs(1));
        assert!(matches!(
            timeout.into_send_error(Step::Before),
            SendError::Transient { .. }
        ));
        let withheld = Failure::Withheld(Withheld::LeaseLost);
        assert!(!withheld.is_network(), "not retried on a fresh connection");
        assert_eq!(
            withheld.into_send_error(Step::Before),
            SendError::Withheld(Withheld::LeaseLost)
        );
    }
}
