//! Spending from the rate limits of a key and its tenant, with one Redis
//! round trip for all the requests of one key that arrive while its check
//! is in flight (a group commit). Alone, a request makes its own check;
//! under load, a busy key's requests share one, decided request by request
//! in arrival order exactly as separate checks would be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mailroom_core::ratelimit::{Decision, Guard, Guarded, Rate, RateLimiter};
use tokio::sync::oneshot;

use super::auth::Principal;
use super::keys::Found;
use super::problem::Problem;

/// Requests one shared check decides at most.
const MOST: usize = 256;

/// What a spend did.
#[derive(Debug)]
pub enum Spent {
    /// Spent.
    Done,
    /// The key's record is not the one checked any more (it is this now,
    /// or gone); nothing spent.
    Stale(Option<String>),
}

type Answer = oneshot::Sender<Result<Spent, Problem>>;

/// The requests waiting for one record's next check.
struct Queue {
    /// Where the record is stored, and the record the requests were
    /// checked against: the guard of their shared check.
    slot: String,
    found: Arc<Found>,
    principal: Principal,
    waiting: Vec<(u32, Answer)>,
    /// Whether a task is checking for this queue now; it takes what
    /// arrives meanwhile once its check is back.
    running: bool,
}

/// Rate-limit spends for the API.
pub struct Spender {
    limiter: RateLimiter,
    tenant_rate: Rate,
    /// Keyed by the address of the remembered record, which the queue
    /// holds, so the address cannot be reused while it waits; requests
    /// checked against another version of a record never share a check.
    queues: Mutex<HashMap<usize, Queue>>,
}

impl Spender {
    /// Spends from `limiter`, each tenant allowed `tenant_rate`.
    pub fn new(limiter: RateLimiter, tenant_rate: Rate) -> Arc<Self> {
        Arc::new(Self {
            limiter,
            tenant_rate,
            queues: Mutex::default(),
        })
    }

    /// Spends `cost` for `principal`, the holder of the key whose record
    /// `found` (stored at `slot`) is, if Redis still holds that record.
    pub async fn spend_guarded(
        self: &Arc<Self>,
        slot: &str,
        found: &Arc<Found>,
        principal: &Principal,
        cost: u32,
    ) -> Result<Spent, Problem> {
        let (answer, answered) = oneshot::channel();
        let id = Arc::as_ptr(found) as usize;
        let first = {
            let mut queues = self.queues();
            let queue = queues.entry(id).or_insert_with(|| Queue {
                slot: slot.to_owned(),
                found: Arc::clone(found),
                principal: principal.clone(),
                waiting: Vec::new(),
                running: false,
            });
            queue.waiting.push((cost, answer));
            !std::mem::replace(&mut queue.running, true)
        };
        if first {
            // A task of its own, so a caller that goes away mid-check does
            // not strand the requests that joined it.
            tokio::spawn(Arc::clone(self).run(id));
        }
        answered
            .await
            .unwrap_or_else(|_| Err(Problem::unavailable("the rate limiter")))
    }

    /// Spends `cost` for `principal` with no record to guard (a JWT).
    pub async fn spend(&self, principal: &Principal, cost: u32) -> Result<Spent, Problem> {
        let mut decided = self.check(None, principal, &[cost]).await;
        match decided.pop() {
            Some(answer) => answer,
            None => Err(Problem::unavailable("the rate limiter")),
        }
    }

    /// Checks what is waiting for record `id`, and again while more came
    /// in meanwhile.
    async fn run(self: Arc<Self>, id: usize) {
        loop {
            let (slot, found, principal, waiting) = {
                let mut queues = self.queues();
                let Some(queue) = queues.get_mut(&id) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queues.remove(&id);
                    return;
                }
                let take = queue.waiting.len().min(MOST);
                let waiting: Vec<_> = queue.waiting.drain(..take).collect();
                (
                    queue.slot.clone(),
                    Arc::clone(&queue.found),
                    queue.principal.clone(),
                    waiting,
                )
            };
            let (costs, answers): (Vec<u32>, Vec<Answer>) = waiting.into_iter().unzip();
            let guard = Guard {
                key: &slot,
                expected: &found.json,
            };
            let decided = self.check(Some(guard), &principal, &costs).await;
            for (answer, decision) in answers.into_iter().zip(decided) {
                // A caller that went away needs no answer.
                let _ = answer.send(decision);
            }
        }
    }

    /// One check for `costs`; one answer a cost.
    async fn check(
        &self,
        guard: Option<Guard<'_>>,
        principal: &Principal,
        costs: &[u32],
    ) -> Vec<Result<Spent, Problem>> {
        let tenant = &principal.tenant;
        // Both carry the tenant as hash tag; the guard, the key's record,
        // lives elsewhere, so a guarded check needs one Redis, not a
        // Cluster (as the dedup claim does).
        let key = format!("{{{tenant}}}:key:{}", principal.key_id);
        let whole = format!("{{{tenant}}}:tenant");
        let limits = [
            (key.as_str(), principal.rate),
            (whole.as_str(), self.tenant_rate),
        ];
        // A cost over a limit's burst is refused by the script for ever,
        // with a wait that would only send the client round again.
        let burst = principal.rate.count.min(self.tenant_rate.count);
        match self.limiter.check_each_guarded(guard, &limits, costs).await {
            Ok(Guarded::Decided(decisions)) => decisions
                .into_iter()
                .zip(costs)
                .map(|(decision, &cost)| match decision {
                    (Decision::Limited { .. }, _) if cost > burst => {
                        Err(Problem::over_burst(cost, burst))
                    }
                    (Decision::Allowed, _) => Ok(Spent::Done),
                    (Decision::Limited { retry_after }, which) => Err(Problem::rate_limited(
                        retry_after,
                        if which == 0 { "key" } else { "tenant" },
                    )),
                })
                .collect(),
            Ok(Guarded::Changed(current)) => costs
                .iter()
                .map(|_| Ok(Spent::Stale(current.clone())))
                .collect(),
            Err(err) => {
                let problem = Problem::unavailable_because("the rate limiter", &err);
                costs.iter().map(|_| Err(problem.clone())).collect()
            }
        }
    }

    fn queues(&self) -> MutexGuard<'_, HashMap<usize, Queue>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
