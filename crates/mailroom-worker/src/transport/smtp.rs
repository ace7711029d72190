//! The `smtp` transport: a pool of connections to one relay.
//!
//! lettre's pooled `AsyncSmtpTransport` reports a failure without saying
//! at which step it happened; mailroom needs to know, because a connection
//! lost after the end of DATA is *uncertain* (the relay may have taken the
//! message) while one lost before it is plainly transient. So the session
//! is driven here, over lettre's stream and TLS ([`Wire`]), with a timeout
//! on each command, and every reply is checked against the command it
//! answers: a reply no command asked for, or a code the command cannot
//! have (a 2xx to DATA), means the relay and mailroom no longer agree on
//! which reply is whose, and the connection is dropped.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};
use mailroom_core::settings::SmtpSettings;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;

use super::data::data_section;
use super::reply::{Reply, ReplyError};
use super::session::{Relay, Session};
use super::wire::{Wire, WireError};
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
    /// Set (and its waiters woken) when the worker stops: see
    /// [`SmtpTransport::stop_starting`].
    stopping: CancellationToken,
}

/// A delivery waiting for a connection, whose MAIL, RCPT and DATA the
/// holder of a busy one may write after its own end of DATA.
struct Waiter {
    id: u64,
    outline: Outline,
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

/// Whether a transaction's MAIL, RCPT and DATA are still to be written, or
/// were written and their replies read in step by the connection's holder
/// (see [`SmtpTransport::confirm`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Opening {
    ToWrite,
    Read,
}

/// How a transaction ended, and the waiter whose commands followed its end
/// of DATA, to be handed the connection (only when it is still in step).
struct Ended {
    result: Result<Reply, (Step, Failure)>,
    next: Option<Waiter>,
    /// A waiter's commands went out on the connection, and it was not
    /// handed over: it holds their transaction, and is of no further use.
    spent: bool,
}

impl Ended {
    fn failed(step: Step, failure: Failure) -> Self {
        Self {
            result: Err((step, failure)),
            next: None,
            spent: false,
        }
    }
}

/// A message as an SMTP transaction writes it, made once before a
/// connection is taken, so a retry over a fresh connection does not make
/// it again (for a 10 MiB message that is a pass over every byte).
pub struct SmtpMessage {
    outline: Outline,
    /// The DATA section, dots doubled and end included: one write.
    body: Vec<u8>,
}

/// What MAIL and RCPT say of a message.
#[derive(Clone)]
struct Outline {
    envelope: Envelope,
    /// Not 7-bit: needs 8BITMIME.
    eight_bit: bool,
    /// Its size as RFC 1870's `SIZE=` counts it (before dots are doubled).
    size: usize,
}

impl SmtpMessage {
    /// `message` as DATA carries it.
    pub fn new(message: OutgoingMessage) -> Self {
        let outline = Outline {
            envelope: message.envelope,
            eight_bit: !message.raw.is_ascii(),
            size: message.raw.len(),
        };
        let body = data_section(&message.raw);
        Self { outline, body }
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
        let relay = Relay::from_settings(settings)?;
        let pool_size = usize::try_from(settings.pool_size).unwrap_or(1).max(1);
        Ok(Self {
            relay,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(pool_size)),
            pool_size,
            waiters: Mutex::new(VecDeque::new()),
            waiter_ids: AtomicU64::new(0),
            stopping: CancellationToken::new(),
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

    /// Starts no more transactions (see [`super::Transport::stop_starting`]).
    pub fn stop_starting(&self) {
        self.stopping.cancel();
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
                (Some(session), permit, Opening::Read)
            }
            // Stopping: no transaction starts (the permit goes back).
            Obtained::Permit(_) if self.stopping.is_cancelled() => {
                return Err(SendError::Withheld(Withheld::Stopping));
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
                //
                // So does a refusal before the body: on a reused
                // connection it may be a reply the relay sent late for an
                // earlier message, read as ours (SMTP cannot tell); a
                // fresh connection gets the relay's own answer.
                Ended {
                    result: Err((Step::Before, err)),
                    next: None,
                    ..
                } if err.is_network() || matches!(err, Failure::Refused(_)) => {
                    abort(&mut session.smtp).await;
                }
                ended => return self.settle(session, permit, ended).await,
            }
        }
        if self.stopping.is_cancelled() {
            return Err(SendError::Withheld(Withheld::Stopping));
        }
        // Boxed: opening a session (TCP, STARTTLS, AUTH) is a large future,
        // rarely run; inline, every send would carry (and move) its space.
        let mut session = Box::pin(self.relay.connect()).await?;
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
        let Ended {
            result,
            next,
            spent,
        } = ended;
        if let Some(next) = next {
            next.hand(session, permit);
        } else {
            let fit = match &result {
                Ok(_) => !spent,
                // Refused here, before any of the message went: the
                // connection is as it was, and a flood of such messages does
                // not open one each. Any other failure may have left it out
                // of step.
                Err((_, err)) => err.is_ours(),
            };
            // Bytes after our reply were asked for by no command: the reply
            // was ours (the connection was in step when the body went), but
            // the connection is no longer fit for another.
            if fit && session.smtp.check_in_step().is_ok() {
                self.keep(session);
            } else {
                abort(&mut session.smtp).await;
            }
        }
        result
            .map(|reply| delivered(&reply))
            .map_err(|(step, err)| err.into_send_error(step))
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
            outline: message.outline.clone(),
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
            // Dropping the receiver refuses a connection a holder may hand
            // us meanwhile: it closes it, our commands without a body.
            () = self.stopping.cancelled() => {
                return Err(SendError::Withheld(Withheld::Stopping));
            }
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
        tokio::select! {
            () = self.stopping.cancelled() => Err(SendError::Withheld(Withheld::Stopping)),
            permit = Arc::clone(&self.permits).acquire_owned() => {
                permit.map(Obtained::Permit).map_err(closed)
            }
        }
    }

    /// The first waiter whose commands this connection can carry, with
    /// those commands; waiters that gave up are dropped on the way.
    fn next_waiter(&self, session: &Session) -> Option<(Waiter, String)> {
        let mut waiters = self.lock_waiters();
        while let Some(waiter) = waiters.pop_front() {
            if waiter.handed.is_closed() {
                continue;
            }
            let Ok(group) = opening_group(session, &waiter.outline) else {
                // It needs an extension this relay lacks, or is over its
                // SIZE: it fails on a connection of its own, with its own
                // error.
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
            abort(&mut idle.session.smtp).await;
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
        while let Some(mut candidate) = idle.pop() {
            // What a relay sent an idle connection (a 421 as it closes, a
            // stray line) is no reply of ours: such a connection is dropped.
            if candidate.since.elapsed() < MAX_IDLE
                && !candidate.session.smtp.is_broken()
                && candidate.session.smtp.check_in_step().is_ok()
            {
                return Some(candidate.session);
            }
        }
        None
    }

    fn keep(&self, session: Session) {
        let mut idle = self.lock_idle();
        if idle.len() < self.pool_size {
            idle.push(Idle {
                session,
                since: Instant::now(),
            });
        }
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
        // Checked before a waiter is taken too (`end_data` checks again),
        // so a connection out of step does not take a waiter down with it.
        if let Err(err) = session.smtp.check_in_step() {
            return Ended::failed(Step::Before, Failure::Wire(err));
        }
        let data = &message.body;
        let next = (session.pipelining && data.len() <= HAND_OVER_MAX)
            .then(|| self.next_waiter(session))
            .flatten();
        let Some((waiter, group)) = next else {
            return Ended {
                result: self.end_data(&mut session.smtp, data).await,
                next: None,
                spent: false,
            };
        };
        let mut both = Vec::with_capacity(data.len() + group.len());
        both.extend_from_slice(data);
        both.extend_from_slice(group.as_bytes());
        let result = self.end_data(&mut session.smtp, &both).await;
        // No usable reply leaves the waiter to wait for another connection.
        if !matches!(&result, Ok(_) | Err((_, Failure::Refused(_)))) {
            return Ended {
                result,
                next: None,
                spent: true,
            };
        }
        self.confirm(&mut session.smtp, result, waiter).await
    }

    /// Reads the replies to `waiter`'s commands, which followed our end of
    /// DATA, before our `result` is believed. Fewer than those commands
    /// were owed (some came, then none) means the relay did not answer our
    /// end of DATA: its reply to the waiter's MAIL was read as ours, and
    /// our outcome is uncertain. More (a stray line) leaves ours as read:
    /// the connection was in step when our body went, so the stray came
    /// after our reply. In step, the waiter gets the connection with its
    /// replies read; otherwise it tries again on a connection of its own.
    async fn confirm(
        &self,
        connection: &mut Wire,
        result: Result<Reply, (Step, Failure)>,
        waiter: Waiter,
    ) -> Ended {
        let count = waiter.outline.envelope.to().len() + 2;
        let (replies, failure) = self.read_replies(connection, count).await;
        let short = match failure {
            None if judge_opening(connection, &replies).is_ok() => {
                return Ended {
                    result,
                    next: Some(waiter),
                    spent: false,
                };
            }
            Some(
                failure @ (Failure::Timeout { .. }
                | Failure::Wire(WireError::Closed | WireError::Io(_))),
            ) if !replies.is_empty() => Some(failure),
            _ => None,
        };
        let result = match short {
            None => result,
            Some(failure) => Err((
                Step::AfterData,
                Failure::OutOfStep(format!(
                    "{} of the {count} replies owed to the next message's commands came \
                     ({failure}): the reply read as this message's may have been the first \
                     of them",
                    replies.len()
                )),
            )),
        };
        Ended {
            result,
            next: None,
            spent: true,
        }
    }

    /// Writes the DATA section `data` (and what follows it) and reads the
    /// reply to its end: a 2xx, or the relay's refusal.
    async fn end_data(&self, connection: &mut Wire, data: &[u8]) -> Result<Reply, (Step, Failure)> {
        let after = |failure| (Step::AfterData, failure);
        // Bytes unread now mean the 354 may not have been ours; the body
        // has not gone, so that failure is plainly transient.
        connection
            .check_in_step()
            .map_err(|err| (Step::Before, Failure::Wire(err)))?;
        // "After" starts as the write begins: a connection lost during it
        // may have carried the end. A large message to a slow relay may
        // take long to write: each chunk, not the whole, has its timeout.
        for chunk in data.chunks(WRITE_CHUNK) {
            self.timed(connection.send(chunk)).await.map_err(after)?;
        }
        let reply = within(Wait::Data, self.relay.data_timeout, connection.read_reply()).await;
        // A reply too long to read whole still said what became of the
        // message: taken as uncertain, an accepted one would be sent again.
        // The connection is broken by it and not reused.
        let reply = match reply {
            Err(Failure::Wire(WireError::Reply(ReplyError::TooLong { code: Some(code) }))) => {
                Ok(Reply::cut(code))
            }
            reply => reply,
        };
        expect(reply, is_done, "the end of DATA").map_err(after)
    }

    /// Writes (unless `opening` says they were written) and reads MAIL,
    /// RCPT for each recipient and DATA.
    async fn open(
        &self,
        session: &mut Session,
        message: &SmtpMessage,
        opening: Opening,
    ) -> Result<(), Failure> {
        // One reply for MAIL, one a recipient, one for DATA. A refusal ends
        // the session (it is aborted), so no body follows a DATA that a
        // refused RCPT made fail.
        let replies = message.outline.envelope.to().len() + 2;
        if opening == Opening::Read {
            return Ok(());
        }
        if session.pipelining {
            let group = opening_group(session, &message.outline)?;
            let connection = &mut session.smtp;
            self.timed(connection.write(group.as_bytes())).await?;
            return self.read_opening(connection, replies).await;
        }
        let (mail, rcpts) = envelope_commands(session, &message.outline)?;
        let connection = &mut session.smtp;
        expect(self.timed(connection.command(mail)).await, is_done, "MAIL")?;
        for rcpt in rcpts {
            expect(self.timed(connection.command(rcpt)).await, is_done, "RCPT")?;
        }
        expect(self.timed(connection.command(Data)).await, is_go_on, "DATA")?;
        Ok(())
    }

    /// Reads the `count` replies to a pipelined MAIL, RCPTs and DATA, all
    /// of them before judging any: with a stray line among them, every
    /// reply comes one command late, which only the last one (a 2xx where
    /// DATA wants 354) or bytes left over can show.
    async fn read_opening(&self, connection: &mut Wire, count: usize) -> Result<(), Failure> {
        let (replies, failure) = self.read_replies(connection, count).await;
        match failure {
            Some(failure) => Err(failure),
            None => judge_opening(connection, &replies),
        }
    }

    /// Up to `count` replies, each within `smtp.command_timeout`, and what
    /// stopped the reading short.
    async fn read_replies(
        &self,
        connection: &mut Wire,
        count: usize,
    ) -> (Vec<Reply>, Option<Failure>) {
        let mut replies = Vec::with_capacity(count);
        for _ in 0..count {
            match self.timed(connection.read_reply()).await {
                Ok(reply) => replies.push(reply),
                Err(failure) => return (replies, Some(failure)),
            }
        }
        (replies, None)
    }

    /// `io`, given `smtp.command_timeout`.
    async fn timed<T>(&self, io: impl Future<Output = Result<T, WireError>>) -> Result<T, Failure> {
        within(Wait::Command, self.relay.command_timeout, io).await
    }
}

/// Judges the replies to a pipelined MAIL, RCPTs and DATA, all read, with
/// nothing left over: a 354 last, a 2xx before it, or a refusal.
fn judge_opening(connection: &mut Wire, replies: &[Reply]) -> Result<(), Failure> {
    connection.check_in_step().map_err(Failure::Wire)?;
    let Some((data, envelope)) = replies.split_last() else {
        return Ok(());
    };
    if !is_go_on(data.code()) && !is_refusal(data.code()) {
        return Err(out_of_step(data, "DATA"));
    }
    for reply in envelope {
        if !is_done(reply.code()) && !is_refusal(reply.code()) {
            return Err(out_of_step(reply, "MAIL or RCPT"));
        }
    }
    let refused = envelope
        .iter()
        .chain([data])
        .find(|reply| is_refusal(reply.code()));
    match refused {
        Some(reply) => Err(Failure::Refused(reply.clone())),
        None => Ok(()),
    }
}

/// How much of a message one write sends, each within
/// `smtp.command_timeout`.
const WRITE_CHUNK: usize = 64 * 1024;

/// What a timed step waits for, and so which setting limits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// A reply, or a chunk of the message written: `smtp.command_timeout`.
    Command,
    /// The reply to the end of DATA: `smtp.data_timeout`.
    Data,
}

impl Wait {
    /// The setting that limits the wait.
    fn setting(self) -> &'static str {
        match self {
            Self::Command => "smtp.command_timeout",
            Self::Data => "smtp.data_timeout",
        }
    }
}

/// `io`, within `limit` (the setting of `wait`).
async fn within<T>(
    wait: Wait,
    limit: Duration,
    io: impl Future<Output = Result<T, WireError>>,
) -> Result<T, Failure> {
    tokio::time::timeout(limit, io)
        .await
        .map_err(|_| Failure::Timeout { wait, limit })?
        .map_err(Failure::Wire)
}

/// What went wrong in a transaction.
#[derive(Debug, thiserror::Error)]
pub(super) enum Failure {
    /// The relay refused: a 4xx or 5xx reply.
    #[error("{0}")]
    Refused(Reply),
    /// No usable reply: the connection failed, or the relay's bytes are
    /// not a reply, or came unasked.
    #[error("{0}")]
    Wire(WireError),
    /// A code the command cannot have (a 2xx to DATA, a 354 to MAIL): the
    /// relay and mailroom disagree on which reply answers which command.
    #[error("{0}")]
    OutOfStep(String),
    /// No reply (or no progress writing) within `limit`.
    #[error("no reply within {} ({limit:?})", wait.setting())]
    Timeout {
        /// What was waited for.
        wait: Wait,
        /// The limit.
        limit: Duration,
    },
    /// The message needs an extension the relay lacks.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The message is larger than the relay's `SIZE`.
    #[error("the message ({size} bytes) is over the relay's SIZE limit ({limit} bytes)")]
    TooLarge { size: usize, limit: usize },
    /// The login could not be put into a command.
    #[error("{0}")]
    Auth(String),
    /// The hand-over hook stopped the send.
    #[error("{0}")]
    Withheld(Withheld),
}

impl Failure {
    /// The connection is of no use, and nothing went out on it that a
    /// fresh one would not send again.
    fn is_network(&self) -> bool {
        matches!(self, Self::Wire(_) | Self::OutOfStep(_))
    }

    /// Decided here, from what the relay stated, before anything of the
    /// message was written.
    fn is_ours(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::Unsupported(_))
    }

    fn into_send_error(self, step: Step) -> SendError {
        match self {
            // The code is the error's own; the text follows it once.
            Self::Refused(reply) if reply.is(5) => {
                SendError::permanent(reply.code(), &reply.text())
            }
            Self::Refused(reply) => SendError::transient(Some(reply.code()), &reply.text()),
            Self::Wire(err @ (WireError::Reply(_) | WireError::Unasked))
                if step == Step::AfterData =>
            {
                SendError::uncertain(&format!("no usable reply to the end of DATA: {err}"))
            }
            Self::Wire(err) if step == Step::AfterData => SendError::uncertain(&format!(
                "connection lost after the end of DATA, before the reply: {err}"
            )),
            Self::OutOfStep(what) if step == Step::AfterData => {
                SendError::uncertain(&format!("no reply to the end of DATA, out of step: {what}"))
            }
            Self::Timeout { wait, limit } if step == Step::AfterData => {
                let setting = wait.setting();
                SendError::uncertain(&match wait {
                    Wait::Data => {
                        format!("no reply to the end of DATA within {setting} ({limit:?})")
                    }
                    Wait::Command => {
                        format!("writing the message stalled for {setting} ({limit:?})")
                    }
                })
            }
            Self::Unsupported(what) => SendError::permanent(555, what),
            too_large @ Self::TooLarge { .. } => SendError::permanent(552, &too_large.to_string()),
            Self::Withheld(why) => SendError::Withheld(why),
            other @ (Self::Wire(_) | Self::OutOfStep(_) | Self::Timeout { .. } | Self::Auth(_)) => {
                SendError::transient(None, &other.to_string())
            }
        }
    }
}

/// The reply `read`, if its code is one `wanted` takes; a 4xx or 5xx is
/// the relay's refusal, and any other code is a reply to some other
/// command.
pub(super) fn expect(
    read: Result<Reply, Failure>,
    wanted: impl Fn(u16) -> bool,
    command: &str,
) -> Result<Reply, Failure> {
    let reply = read?;
    if wanted(reply.code()) {
        Ok(reply)
    } else if is_refusal(reply.code()) {
        Err(Failure::Refused(reply))
    } else {
        Err(out_of_step(&reply, command))
    }
}

pub(super) fn out_of_step(reply: &Reply, command: &str) -> Failure {
    Failure::OutOfStep(format!("{} in reply to {command}", reply.code()))
}

/// A 2xx: the command was done.
pub(super) fn is_done(code: u16) -> bool {
    code / 100 == 2
}

/// 354, the only reply that lets DATA's body follow.
fn is_go_on(code: u16) -> bool {
    code == 354
}

/// A 4xx or 5xx.
fn is_refusal(code: u16) -> bool {
    matches!(code / 100, 4 | 5)
}

/// A failure while setting up a session: transient, whatever it is (a
/// 5xx greeting or a refused login is no fault of the message).
pub(super) fn setup_error(step: &str, failure: Failure) -> SendError {
    match failure {
        Failure::Refused(reply) => {
            SendError::transient(Some(reply.code()), &format!("{step}: {}", reply.text()))
        }
        other => SendError::transient(None, &format!("{step}: {other}")),
    }
}

/// Ends a session: QUIT, its reply, then close, given [`QUIT_WAIT`]: a
/// relay that stopped answering (the usual reason to be here) would hold
/// the job, and its claim, for ever.
pub(super) async fn abort(connection: &mut Wire) {
    if tokio::time::timeout(QUIT_WAIT, connection.quit())
        .await
        .is_err()
    {
        tracing::debug!("the relay did not answer QUIT: connection dropped");
    }
}

/// The relay's answer as a delivery.
fn delivered(reply: &Reply) -> Delivered {
    Delivered { code: reply.code() }
}

/// MAIL, RCPT for each recipient and DATA, as one pipelined group.
fn opening_group(session: &Session, outline: &Outline) -> Result<String, Failure> {
    let (mail, rcpts) = envelope_commands(session, outline)?;
    let mut group = mail.to_string();
    for rcpt in rcpts {
        group.push_str(&rcpt.to_string());
    }
    group.push_str(&Data.to_string());
    Ok(group)
}

/// MAIL, with the parameters the message needs on this connection, and
/// RCPT for each recipient.
fn envelope_commands(session: &Session, outline: &Outline) -> Result<(Mail, Vec<Rcpt>), Failure> {
    let parameters = mail_parameters(session, outline)?;
    let envelope = &outline.envelope;
    let rcpts = envelope
        .to()
        .iter()
        .map(|recipient| Rcpt::new(recipient.clone(), Vec::new()))
        .collect();
    Ok((Mail::new(envelope.from().cloned(), parameters), rcpts))
}

/// MAIL parameters the message needs (as lettre's own `send` picks them),
/// and its size where the relay takes `SIZE` (RFC 1870): a message over
/// the relay's limit is refused here, before its body goes.
fn mail_parameters(session: &Session, outline: &Outline) -> Result<Vec<MailParameter>, Failure> {
    let (info, envelope) = (&session.info, &outline.envelope);
    let mut parameters = Vec::new();
    if let Some(limit) = session.size_limit {
        if limit > 0 && outline.size > limit {
            return Err(Failure::TooLarge {
                size: outline.size,
                limit,
            });
        }
        parameters.push(MailParameter::Size(outline.size));
    }
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
    if outline.eight_bit {
        if !info.supports_feature(Extension::EightBitMime) {
            return Err(Failure::Unsupported(
                "the message is not 7-bit and the relay lacks 8BITMIME",
            ));
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use mailroom_core::settings::{Secret, TlsMode};

    use super::*;

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

    /// What a scripted relay answers: given the command's verb (upper
    /// case; `GREETING` for the greeting, `.` for the end of DATA) and the
    /// command's line, or for the end of DATA the message's text.
    type Script = Arc<dyn Fn(&str, &str) -> Vec<u8> + Send + Sync>;

    /// A relay on 127.0.0.1 that answers each connection by `script`, and
    /// lists the messages it took: those whose end of DATA it answered with
    /// a 2xx.
    async fn scripted_relay(script: Script) -> (u16, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let taken = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&taken);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_script(stream, Arc::clone(&script), Arc::clone(&kept)));
            }
        });
        (port, taken)
    }

    async fn serve_script(
        stream: tokio::net::TcpStream,
        script: Script,
        taken: Arc<Mutex<Vec<String>>>,
    ) {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        if write.write_all(&script("GREETING", "")).await.is_err() {
            return;
        }
        let mut body: Option<String> = None;
        while let Ok(Some(line)) = lines.next_line().await {
            let reply = match body.as_mut() {
                Some(text) if line != "." => {
                    text.push_str(&line);
                    text.push('\n');
                    continue;
                }
                Some(text) => {
                    let text = std::mem::take(text);
                    body = None;
                    let reply = script(".", &text);
                    if reply.starts_with(b"2") {
                        taken.lock().expect("lock").push(text);
                    }
                    reply
                }
                None => {
                    let verb = line.split(' ').next().unwrap_or_default();
                    let verb = verb.to_ascii_uppercase();
                    let reply = script(&verb, &line);
                    if verb == "DATA" && reply.starts_with(b"354") {
                        body = Some(String::new());
                    }
                    if verb == "QUIT" {
                        let _ = write.write_all(&reply).await;
                        return;
                    }
                    reply
                }
            };
            if write.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    /// Replies that say `250 ok` to everything but the greeting, EHLO
    /// (`ehlo`), DATA (354) and the end of DATA (`end` of the text).
    fn usual(ehlo: &'static str, end: fn(&str) -> String) -> Script {
        Arc::new(move |verb: &str, text: &str| {
            let reply = match verb {
                "GREETING" => "220 relay ESMTP\r\n".to_owned(),
                "EHLO" => ehlo.to_owned(),
                "DATA" => "354 go on\r\n".to_owned(),
                "QUIT" => "221 bye\r\n".to_owned(),
                "." => end(text),
                _ => "250 ok\r\n".to_owned(),
            };
            reply.into_bytes()
        })
    }

    const PIPELINING: &str = "250-relay\r\n250 PIPELINING\r\n";
    const NO_PIPELINING: &str = "250 relay\r\n";

    fn plain_transport(port: u16, pool_size: u32) -> SmtpTransport {
        plain_transport_within(port, pool_size, Duration::from_secs(5))
    }

    /// [`plain_transport`] with `command_timeout`.
    fn plain_transport_within(
        port: u16,
        pool_size: u32,
        command_timeout: Duration,
    ) -> SmtpTransport {
        SmtpTransport::new(&SmtpSettings {
            url: Secret::new(format!("smtp://127.0.0.1:{port}")),
            tls: TlsMode::None,
            pool_size,
            command_timeout,
            ..SmtpSettings::default()
        })
        .expect("transport")
    }

    /// A message whose body is `text`.
    fn message_saying(text: &str) -> SmtpMessage {
        let address: lettre::Address = "ada@example.org".parse().expect("address");
        SmtpMessage::new(OutgoingMessage {
            envelope: Envelope::new(Some(address.clone()), vec![address]).expect("envelope"),
            message_id: "<1@example.org>".to_owned(),
            raw: format!("Subject: hi\r\n\r\n{text}\r\n").into_bytes(),
        })
    }

    /// Sends messages saying each of `texts`, all at once (one after
    /// another with `at_once` false), and gives each one's outcome.
    async fn send_all(
        transport: &SmtpTransport,
        texts: &[&str],
        at_once: bool,
    ) -> Vec<Result<Delivered, SendError>> {
        let messages: Vec<SmtpMessage> = texts.iter().map(|text| message_saying(text)).collect();
        if at_once {
            let sends = messages.iter().map(|message| transport.send(message, None));
            return futures_util::future::join_all(sends).await;
        }
        let mut outcomes = Vec::new();
        for message in &messages {
            outcomes.push(transport.send(message, None).await);
        }
        outcomes
    }

    /// How many of the taken messages have `text` as a line.
    fn taken_saying(taken: &Mutex<Vec<String>>, text: &str) -> usize {
        let taken = taken.lock().expect("lock");
        taken
            .iter()
            .filter(|body| body.lines().any(|line| line == text))
            .count()
    }

    /// RFC 5321 §4.2: `Reply-code [ SP textstring ] CRLF`. A relay that
    /// answers every command with a bare code, a multi-line EHLO with
    /// empty lines included, delivers each message once.
    #[tokio::test]
    async fn bare_codes_are_replies() {
        for (ehlo, at_once) in [
            ("250\r\n", false),
            ("250-\r\n250-\r\n250 PIPELINING\r\n", false),
            ("250-\r\n250-\r\n250 PIPELINING\r\n", true),
        ] {
            let script: Script = Arc::new(move |verb: &str, _: &str| {
                let reply = match verb {
                    "GREETING" => "220\r\n",
                    "EHLO" => ehlo,
                    "DATA" => "354\r\n",
                    "QUIT" => "221\r\n",
                    _ => "250\r\n",
                };
                reply.as_bytes().to_vec()
            });
            each_taken_once(script, &["one", "two", "three"], at_once, ehlo).await;
        }
    }

    /// Sends `texts` over one connection to a relay following `script`
    /// (its EHLO reply `ehlo`); each must be delivered, and taken once.
    async fn each_taken_once(script: Script, texts: &[&str], at_once: bool, ehlo: &str) {
        let (port, taken) = scripted_relay(script).await;
        let transport = plain_transport(port, 1);
        for outcome in send_all(&transport, texts, at_once).await {
            assert_eq!(outcome, Ok(Delivered { code: 250 }), "{ehlo:?}");
        }
        assert_eq!(taken.lock().expect("lock").len(), texts.len(), "{ehlo:?}");
        transport.shutdown().await;
    }

    /// A reply line far over RFC 5321's 512 octets still carries its code:
    /// the message was taken, once.
    #[tokio::test]
    async fn long_replies_keep_their_code() {
        for ehlo in [NO_PIPELINING, PIPELINING] {
            let script = usual(ehlo, |text| {
                let long = "A".repeat(5000);
                if text.contains("multi") {
                    format!("250-2.0.0 {long}\r\n250 2.0.0 {long}\r\n")
                } else {
                    format!("250 2.0.0 Ok: queued as {long}\r\n")
                }
            });
            each_taken_once(script, &["one", "multi", "three"], true, ehlo).await;
        }
    }

    /// A reply to the end of DATA beyond any bound counts by the code its
    /// lines gave, which every line of a reply carries: a `250` is taken
    /// once, a `550` refused. One whose first line never ends gave none:
    /// the outcome is uncertain.
    #[tokio::test]
    async fn a_boundless_reply_counts_by_its_code() {
        let script = usual(NO_PIPELINING, |text| {
            let code = if text.contains("refused") { 550 } else { 250 };
            format!("{code}-{}\r\n", "A".repeat(1000)).repeat(100)
        });
        each_taken_once(Arc::clone(&script), &["one", "two"], false, NO_PIPELINING).await;
        let (port, _taken) = scripted_relay(script).await;
        let transport = plain_transport(port, 1);
        let outcome = transport.send(&message_saying("refused"), None).await;
        assert!(
            matches!(outcome, Err(SendError::Permanent { code: 550, .. })),
            "{outcome:?}"
        );
        let script = usual(NO_PIPELINING, |_| format!("250 {}", "A".repeat(100_000)));
        let (port, _taken) = scripted_relay(script).await;
        let transport = plain_transport(port, 1);
        let outcome = transport.send(&message_saying("one"), None).await;
        assert!(
            matches!(outcome, Err(SendError::Uncertain { .. })),
            "{outcome:?}"
        );
    }

    /// A relay that sends a stray reply line after a message's own, then
    /// rejects the next message: each outcome goes to its own message, in
    /// turn or handed over.
    #[tokio::test]
    async fn a_stray_reply_is_no_ones() {
        for (ehlo, at_once) in [
            (NO_PIPELINING, false),
            (PIPELINING, false),
            (PIPELINING, true),
        ] {
            let script = usual(ehlo, |text| {
                if text.contains("stray") {
                    "250 2.0.0 Ok queued\r\n250 2.0.0 stray extra reply\r\n".to_owned()
                } else if text.contains("spam") {
                    "554 5.7.1 rejected: spam\r\n".to_owned()
                } else {
                    "250 2.0.0 Ok queued\r\n".to_owned()
                }
            });
            let (port, taken) = scripted_relay(script).await;
            let transport = plain_transport(port, 1);
            let texts = ["m1 stray", "m2 spam", "m3", "m4 stray", "m5"];
            let outcomes = send_all(&transport, &texts, at_once).await;
            for (text, outcome) in texts.iter().zip(&outcomes) {
                if text.contains("spam") {
                    assert!(
                        matches!(outcome, Err(SendError::Permanent { code: 554, .. })),
                        "{text} {ehlo:?} {at_once}: {outcome:?}"
                    );
                } else {
                    assert_eq!(outcome, &Ok(Delivered { code: 250 }), "{text} {ehlo:?}");
                    assert_eq!(taken_saying(&taken, text), 1, "{text} {ehlo:?}");
                }
            }
            transport.shutdown().await;
        }
    }

    /// A relay that does not answer one message's end of DATA: the reply
    /// to the next message's MAIL, written after that end, is the next
    /// thing read. The message is not marked sent (or refused) on it: the
    /// next message's replies come one short, so its outcome is uncertain,
    /// and the next message goes on a fresh connection.
    #[tokio::test]
    async fn a_missing_reply_to_the_end_of_data_is_not_taken_from_the_next_message() {
        use std::sync::atomic::AtomicBool;
        for next_mail in ["250 2.1.0 Ok\r\n", "550 5.7.1 sender refused\r\n"] {
            let skipped = Arc::new(AtomicBool::new(false));
            let script: Script = Arc::new(move |verb: &str, text: &str| {
                let reply = match verb {
                    "GREETING" => "220 relay ESMTP\r\n",
                    "EHLO" => PIPELINING,
                    "DATA" => "354 go on\r\n",
                    "QUIT" => "221 bye\r\n",
                    "." if text.contains("unanswered") => {
                        skipped.store(true, Ordering::SeqCst);
                        ""
                    }
                    "." => "250 2.0.0 Ok queued\r\n",
                    "MAIL" if skipped.swap(false, Ordering::SeqCst) => next_mail,
                    _ => "250 2.1.5 Ok\r\n",
                };
                reply.as_bytes().to_vec()
            });
            let (port, taken) = scripted_relay(script).await;
            let transport = plain_transport_within(port, 1, Duration::from_millis(500));
            let outcomes = send_all(&transport, &["m1 unanswered", "m2"], true).await;
            assert!(
                matches!(&outcomes[0], Err(SendError::Uncertain { .. })),
                "{next_mail:?}: {:?}",
                outcomes[0]
            );
            if next_mail.starts_with('2') {
                assert_eq!(outcomes[1], Ok(Delivered { code: 250 }), "{next_mail:?}");
                assert_eq!(taken_saying(&taken, "m2"), 1);
            }
            assert_eq!(taken_saying(&taken, "m1 unanswered"), 0);
            transport.shutdown().await;
        }
    }

    /// A relay that refuses EHLO (RFC 821 only) is greeted with HELO, and
    /// takes messages without any extension.
    #[tokio::test]
    async fn a_relay_that_refuses_ehlo_is_greeted_with_helo() {
        let script: Script = Arc::new(|verb: &str, _: &str| {
            let reply = match verb {
                "GREETING" => "220 old relay\r\n",
                "EHLO" => "502 5.5.2 command not recognized\r\n",
                "HELO" => "250 old relay\r\n",
                "DATA" => "354 go on\r\n",
                "QUIT" => "221 bye\r\n",
                _ => "250 ok\r\n",
            };
            reply.as_bytes().to_vec()
        });
        each_taken_once(script, &["one", "two"], true, "no EHLO").await;
    }

    /// A refusal that comes late for one message is read as the reply to
    /// the next one's MAIL on the same connection: that refusal is asked
    /// again on a fresh connection, where the relay accepts the message.
    #[tokio::test]
    async fn a_late_stray_refusal_is_asked_again_on_a_fresh_connection() {
        use std::sync::atomic::AtomicBool;
        let owed = Arc::new(AtomicBool::new(false));
        let script: Script = Arc::new(move |verb: &str, text: &str| {
            let reply = match verb {
                "GREETING" => "220 relay ESMTP\r\n",
                "EHLO" => NO_PIPELINING,
                "DATA" => "354 go on\r\n",
                "QUIT" => "221 bye\r\n",
                "." => {
                    owed.store(text.contains("late"), Ordering::SeqCst);
                    "250 2.0.0 Ok queued\r\n"
                }
                "MAIL" if owed.swap(false, Ordering::SeqCst) => {
                    "554 5.7.1 late stray rejection\r\n250 ok\r\n"
                }
                _ => "250 ok\r\n",
            };
            reply.as_bytes().to_vec()
        });
        let (port, taken) = scripted_relay(script).await;
        let transport = plain_transport(port, 1);
        let texts = ["m1 late", "m2", "m3 late", "m4"];
        let outcomes = send_all(&transport, &texts, false).await;
        for (text, outcome) in texts.iter().zip(&outcomes) {
            assert_eq!(outcome, &Ok(Delivered { code: 250 }), "{text}");
            assert_eq!(taken_saying(&taken, text), 1, "{text}");
        }
        transport.shutdown().await;
    }

    /// DATA wants 354: a refusal fails the transaction with the relay's
    /// code, and a 2xx means the replies are out of step; either way no
    /// body was sent, so the failure is plainly transient or permanent.
    #[tokio::test]
    async fn data_must_be_answered_with_354() {
        for (ehlo, data, permanent) in [
            (NO_PIPELINING, "250 2.0.0 ok\r\n", false),
            (PIPELINING, "250 2.0.0 ok\r\n", false),
            (NO_PIPELINING, "554 5.5.1 no valid recipients\r\n", true),
            (PIPELINING, "451 4.3.0 try later\r\n", false),
        ] {
            let script: Script = Arc::new(move |verb: &str, _: &str| {
                let reply = match verb {
                    "GREETING" => "220 relay\r\n",
                    "EHLO" => ehlo,
                    "DATA" => data,
                    "QUIT" => "221 bye\r\n",
                    _ => "250 ok\r\n",
                };
                reply.as_bytes().to_vec()
            });
            let (port, taken) = scripted_relay(script).await;
            let transport = plain_transport(port, 1);
            let outcome = transport.send(&message_saying("one"), None).await;
            match outcome {
                Err(SendError::Permanent { .. }) if permanent => {}
                Err(SendError::Transient { .. }) if !permanent => {}
                other => panic!("{data:?} {ehlo:?}: {other:?}"),
            }
            assert!(taken.lock().expect("lock").is_empty());
        }
    }

    /// AUTH LOGIN answers the relay's challenges; a bare 235 is a login.
    #[tokio::test]
    async fn auth_login_answers_its_challenges() {
        let script: Script = Arc::new(|verb: &str, _: &str| {
            let reply = match verb {
                "GREETING" => "220 relay\r\n",
                "EHLO" => "250-relay\r\n250 AUTH LOGIN\r\n",
                "AUTH" => "334 VXNlcm5hbWU6\r\n",
                // base64 of "mailer", then of "s3cret", upper-cased.
                "BWFPBGVY" => "334 UGFzc3dvcmQ6\r\n",
                "CZNJCMV0" => "235\r\n",
                "DATA" => "354\r\n",
                "QUIT" => "221\r\n",
                _ => "250\r\n",
            };
            reply.as_bytes().to_vec()
        });
        let (port, taken) = scripted_relay(script).await;
        let transport = SmtpTransport::new(&SmtpSettings {
            url: Secret::new(format!("smtp://127.0.0.1:{port}")),
            tls: TlsMode::None,
            username: Some("mailer".to_owned()),
            password: Secret::new("s3cret"),
            command_timeout: Duration::from_secs(5),
            ..SmtpSettings::default()
        })
        .expect("transport");
        let outcome = transport.send(&message_saying("one"), None).await;
        assert_eq!(outcome, Ok(Delivered { code: 250 }));
        assert_eq!(taken_saying(&taken, "one"), 1);
    }

    #[test]
    fn codes_pick_the_way() {
        let timeout = Failure::Timeout {
            wait: Wait::Command,
            limit: Duration::from_secs(1),
        };
        assert!(matches!(
            timeout.into_send_error(Step::AfterData),
            SendError::Uncertain { .. }
        ));
        let timeout = Failure::Timeout {
            wait: Wait::Command,
            limit: Duration::from_secs(1),
        };
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

    /// A relay that states a `SIZE` limit gets `SIZE=` with MAIL, and a
    /// message over the limit is refused for good before any of it goes,
    /// on a connection kept for the next; a relay whose `SIZE` states no
    /// limit takes any.
    #[tokio::test]
    async fn a_message_over_the_relays_size_is_refused_before_it_goes() {
        const LIMITED: &str = "250-relay\r\n250-PIPELINING\r\n250 SIZE 100\r\n";
        const UNLIMITED: &str = "250-relay\r\n250 SIZE\r\n";
        for (ehlo, big_goes) in [(LIMITED, false), (UNLIMITED, true)] {
            let usual = usual(ehlo, |_| "250 ok\r\n".to_owned());
            let connections = Arc::new(AtomicU64::new(0));
            let counted = Arc::clone(&connections);
            let script: Script = Arc::new(move |verb: &str, line: &str| {
                if verb == "GREETING" {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                if verb == "MAIL" && !line.contains(" SIZE=") {
                    return b"555 5.5.4 SIZE= expected\r\n".to_vec();
                }
                usual(verb, line)
            });
            let (port, taken) = scripted_relay(script).await;
            let transport = plain_transport(port, 1);
            let small = transport.send(&one_message(), None).await;
            assert_eq!(small, Ok(Delivered { code: 250 }), "{ehlo:?}");
            let address: lettre::Address = "ada@example.org".parse().expect("address");
            let big = SmtpMessage::new(OutgoingMessage {
                envelope: Envelope::new(Some(address.clone()), vec![address]).expect("envelope"),
                message_id: "<2@example.org>".to_owned(),
                raw: format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(200)).into_bytes(),
            });
            let sent = transport.send(&big, None).await;
            let after = transport.send(&one_message(), None).await;
            assert_eq!(after, Ok(Delivered { code: 250 }), "{ehlo:?}");
            transport.shutdown().await;
            assert_eq!(connections.load(Ordering::Relaxed), 1, "{ehlo:?}");
            if big_goes {
                assert_eq!(sent, Ok(Delivered { code: 250 }));
                assert_eq!(taken.lock().expect("lock").len(), 3);
            } else {
                match sent {
                    Err(SendError::Permanent { code: 552, detail }) => {
                        assert!(detail.contains("SIZE limit (100 bytes)"), "{detail}");
                    }
                    other => panic!("expected a 552, got {other:?}"),
                }
                assert_eq!(taken.lock().expect("lock").len(), 2, "only the small ones");
            }
        }
    }
}
