//! Delivery of the proxy's events to mcp-meter, the delivery rules the SDKs follow
//! (README, "Metering a server you cannot change"), spelled in Rust:
//! events wait in memory and go out in batches (`POST /v1/ingest/batch`) by size or interval,
//! from a thread of their own, so that no call waits on it; no answer, 429 and 5xx are retried
//! with the same events (the same keys) after a backoff that honours Retry-After; a full queue
//! drops its oldest waiting event and counts it, never an event of the batch on the wire
//! ([`Outbox`]). Each answer's `killedSessionIds` speaks for the sessions its batch named
//! ([`Kills`]). Authorizations, releases and guard checks, which a call does wait for, are asked
//! from the caller's thread.

use crate::calls::heartbeat;
use backends::metrics::{Counter, LogThrottle};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Kills the proxy remembers at most; past it, the one listed longest ago is forgotten (a call
/// of that session then passes, and the answer to its event lists the kill again).
const MAX_KILLED_SESSIONS: usize = 100_000;

/// Tries of a release that gets no answer, 429 or 5xx; then its reservation lapses on its own.
const RELEASE_ATTEMPTS: u32 = 3;

/// One log line per interval about a full queue: while it stays full, every event drops one.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// mcp-meter's base URL.
    pub url: String,
    /// A key with the `ingest` scope.
    pub api_key: String,
    pub max_batch_events: usize,
    pub flush_interval: Duration,
    /// Events held at most, waiting or on the wire.
    pub max_queue_events: usize,
    pub request_timeout: Duration,
    /// Longest wait for a guard check before the call goes on (fail open).
    pub guard_timeout: Duration,
    /// How often a killed session is asked about again (a heartbeat of it), so that the kill
    /// ends with its limit's window although the session sends no more calls.
    pub kill_recheck: Duration,
}

/// What the proxy counts, for its `/metrics` (`ops` renders them).
#[derive(Default)]
pub struct MeterStats {
    /// Events mcp-meter acknowledged (stored, or duplicates of stored ones).
    pub events_sent: Counter,
    /// Events mcp-meter refused: listed in a 202's errors, or a batch answered 4xx.
    pub events_failed: Counter,
    /// Waiting events the bound dropped.
    pub events_dropped: Counter,
    pub batches_retried: Counter,
    pub guard_fail_open: Counter,
    pub calls_refused: Counter,
    /// Requests (or stdio lines) refused before anything was read from them for the server:
    /// unparsable, too large, too slow, or with a payer header that is not believed.
    pub requests_refused: Counter,
    /// Answer events too large to read for results: their calls ended as unanswered.
    pub answers_unread: Counter,
    /// Releases that got no answer after every try: their reservations lapse on their own.
    pub releases_failed: Counter,
}

struct Shared {
    config: MeterConfig,
    agent: ureq::Agent,
    queue: Mutex<Queue>,
    wake: Condvar,
    killed: RwLock<Kills>,
    stats: MeterStats,
    drop_log: LogThrottle,
}

struct Queue {
    outbox: Outbox,
    /// Set by `close`: deliver what is queued until then, then stop.
    closing: Option<Instant>,
}

/// The events held for delivery: those waiting, oldest first, and how many are in the batch on
/// the wire. A batch on the wire is out of the bound's reach: it leaves `waiting` when it is
/// taken, and a retriable failure puts it back at the front, in order, so that its retry
/// carries the same keys. The bound counts every event held, waiting or on the wire; a full
/// outbox drops its oldest waiting event, or the new one when every event held is on the wire.
/// An event on the wire may be stored already, so only its answer may count it.
///
/// Every event pushed ends in exactly one count: acknowledged or refused (by its batch's
/// answer), dropped (answered by `push`), or held (`held`).
pub(crate) struct Outbox {
    waiting: VecDeque<Value>,
    on_wire: usize,
    max_events: usize,
}

impl Outbox {
    pub(crate) fn new(max_events: usize) -> Outbox {
        Outbox {
            waiting: VecDeque::new(),
            on_wire: 0,
            max_events,
        }
    }

    /// Holds `event`; answers the event dropped to make room for it, if the outbox was full.
    pub(crate) fn push(&mut self, event: Value) -> Option<Value> {
        if self.held() < self.max_events {
            self.waiting.push_back(event);
            return None;
        }
        let Some(oldest) = self.waiting.pop_front() else {
            return Some(event);
        };
        self.waiting.push_back(event);
        Some(oldest)
    }

    /// Takes the oldest waiting events, at most `max`, onto the wire. One batch at a time: the
    /// last one was answered or put back.
    pub(crate) fn take(&mut self, max: usize) -> Vec<Value> {
        assert_eq!(self.on_wire, 0, "one batch on the wire at a time");
        let n = self.waiting.len().min(max);
        self.on_wire = n;
        self.waiting.drain(..n).collect()
    }

    /// The batch on the wire failed and will be sent again: it waits at the front, in order.
    pub(crate) fn put_back(&mut self, batch: Vec<Value>) {
        assert_eq!(
            batch.len(),
            self.on_wire,
            "the batch taken comes back whole"
        );
        self.on_wire = 0;
        for event in batch.into_iter().rev() {
            self.waiting.push_front(event);
        }
    }

    /// The batch on the wire was answered: its events are no longer held.
    pub(crate) fn answered(&mut self, batch: Vec<Value>) {
        assert_eq!(
            batch.len(),
            self.on_wire,
            "the batch taken comes back whole"
        );
        self.on_wire = 0;
    }

    /// The batch on the wire comes back with its answer: put back to go again, or done.
    pub(crate) fn returned(&mut self, batch: Vec<Value>, answer: &Answer) {
        match answer {
            Answer::Retry { .. } => self.put_back(batch),
            _ => self.answered(batch),
        }
    }

    /// Events held: waiting, or on the wire.
    pub(crate) fn held(&self) -> usize {
        self.waiting.len() + self.on_wire
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// Holds `event` in `outbox`; a drop the bound makes is counted and logged (once per
/// `drop_log` interval: a full queue drops one event per event recorded). Answers the dropped
/// event.
pub(crate) fn hold(
    outbox: &mut Outbox,
    stats: &MeterStats,
    drop_log: &LogThrottle,
    event: Value,
) -> Option<Value> {
    let dropped = outbox.push(event)?;
    stats.events_dropped.add(1);
    if let Some(held_back) = drop_log.due(now_ms()) {
        tracing::warn!(
            max_queue_events = outbox.max_events,
            dropped_key = dropped["idempotencyKey"].as_str().unwrap_or(""),
            dropped_total = stats.events_dropped.get(),
            lines_held_back = held_back,
            "event queue full: the oldest waiting event was dropped"
        );
    }
    Some(dropped)
}

/// What mcp-meter's answer to a batch means for the batch.
#[derive(Debug, PartialEq)]
pub(crate) enum Answer {
    /// No answer, 429 or 5xx: the same batch goes again, not before `retry_after`.
    Retry { retry_after: Option<Duration> },
    /// 202: the batch is durable but for `refused` events (its `errors`), and `killed` lists the
    /// killed sessions among those it names (none when the body has no list to read: such an
    /// answer says nothing of kills).
    Acknowledged {
        refused: usize,
        errors: Value,
        killed: Option<Vec<String>>,
    },
    /// Any other status (a wrong key, a malformed batch): sending it again cannot help, so every
    /// event of the batch counts as refused.
    Refused { status: u16, message: Value },
}

/// Reads an answer: `status` 0 when none came.
pub(crate) fn read_answer(
    status: u16,
    retry_after: Option<Duration>,
    body: Value,
    batch_len: usize,
) -> Answer {
    match status {
        0 | 429 | 500.. => Answer::Retry { retry_after },
        202 => Answer::Acknowledged {
            // A 202 means the batch is durable: an event it does not say was refused is counted
            // acknowledged, whatever else the body says.
            refused: (body["failed"].as_u64().unwrap_or(0) as usize).min(batch_len),
            killed: body["killedSessionIds"].as_array().map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect()
            }),
            errors: body["errors"].clone(),
        },
        status => Answer::Refused {
            status,
            message: body["message"].clone(),
        },
    }
}

/// Counts an answered batch's events, logs what needs a person, and merges the kills the
/// answer carries for the sessions the batch named.
pub(crate) fn account(stats: &MeterStats, kills: &RwLock<Kills>, batch: &[Value], answer: &Answer) {
    match answer {
        Answer::Retry { .. } => stats.batches_retried.add(1),
        Answer::Acknowledged {
            refused,
            errors,
            killed,
        } => {
            stats.events_sent.add((batch.len() - refused) as u64);
            stats.events_failed.add(*refused as u64);
            if *refused > 0 {
                tracing::warn!(refused, %errors, "mcp-meter refused events");
            }
            match killed {
                Some(killed) => {
                    let named = batch.iter().filter_map(|e| e["sessionId"].as_str());
                    kills.write().expect("kill list lock").merge(named, killed);
                }
                None => tracing::warn!(
                    "mcp-meter's 202 has no killedSessionIds; the kills stand as they were"
                ),
            }
        }
        Answer::Refused { status, message } => {
            stats.events_failed.add(batch.len() as u64);
            tracing::warn!(status, %message, "mcp-meter refused a batch");
        }
    }
}

/// The sessions mcp-meter said to stop. An answer lists the killed sessions among those its
/// batch named, so it speaks for those alone: a session it names is killed, a session the batch
/// named and the answer does not is not (a kill ends with its limit's window), and every other
/// session keeps what an earlier answer said.
pub(crate) struct Kills {
    /// Each kill, by when an answer last listed it: the oldest is forgotten first.
    learnt: BTreeMap<u64, String>,
    /// Each kill's place in `learnt`, and when it was last listed or asked about.
    sessions: HashMap<String, (u64, Instant)>,
    next: u64,
    max: usize,
}

impl Kills {
    pub(crate) fn new(max: usize) -> Kills {
        Kills {
            learnt: BTreeMap::new(),
            sessions: HashMap::new(),
            next: 0,
            max,
        }
    }

    pub(crate) fn contains(&self, session: &str) -> bool {
        self.sessions.contains_key(session)
    }

    /// Applies one answer: `listed` are its killed sessions, `named` the sessions of its batch.
    pub(crate) fn merge<'a>(&mut self, named: impl Iterator<Item = &'a str>, listed: &[String]) {
        let listed_set: HashSet<&str> = listed.iter().map(String::as_str).collect();
        for session in named {
            if !listed_set.contains(session) {
                if let Some((at, _)) = self.sessions.remove(session) {
                    self.learnt.remove(&at);
                }
            }
        }
        // Every session listed is killed: those of the batch, and (from a server older than
        // per-batch answers) every other kill of the tenant.
        for session in listed {
            if let Some((at, _)) = self.sessions.remove(session) {
                self.learnt.remove(&at);
            } else if self.sessions.len() >= self.max {
                if let Some((_, oldest)) = self.learnt.pop_first() {
                    self.sessions.remove(&oldest);
                }
            }
            self.learnt.insert(self.next, session.clone());
            self.sessions
                .insert(session.clone(), (self.next, Instant::now()));
            self.next += 1;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether `session` is killed and was last listed or asked about `every` ago or more;
    /// if so, it counts as asked about now.
    pub(crate) fn recheck_due(&mut self, session: &str, every: Duration) -> bool {
        match self.sessions.get_mut(session) {
            Some((_, at)) if at.elapsed() >= every => {
                *at = Instant::now();
                true
            }
            _ => false,
        }
    }
}

/// The guard check's answer, as the proxy acts on it.
#[derive(Debug, PartialEq)]
pub enum GuardAnswer {
    Allow,
    Throttle(Duration),
    Block(String),
}

/// A refused authorization: the 402's body (the payment terms), or why none could be had.
#[derive(Debug)]
pub struct Refused {
    pub message: String,
    pub terms: Option<Value>,
}

pub struct Meter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Meter {
    pub fn start(config: MeterConfig) -> Meter {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(config.request_timeout))
            .build()
            .into();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                outbox: Outbox::new(config.max_queue_events),
                closing: None,
            }),
            config,
            agent,
            wake: Condvar::new(),
            killed: RwLock::new(Kills::new(MAX_KILLED_SESSIONS)),
            stats: MeterStats::default(),
            drop_log: LogThrottle::new(DROP_LOG_INTERVAL),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("meter-delivery".into())
            .spawn(move || deliver(&worker))
            .expect("a thread starts");
        Meter {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues one event; never blocks on the network.
    pub fn record(&self, event: Value) {
        let s = &self.shared;
        let mut queue = s.queue.lock().expect("queue lock");
        hold(&mut queue.outbox, &s.stats, &s.drop_log, event);
        if queue.outbox.waiting() >= s.config.max_batch_events {
            s.wake.notify_one();
        }
    }

    /// Whether mcp-meter stopped `session`. A stopped session sends no more calls, so no
    /// answer would say when its kill ends: at most once per `kill_recheck` this queues a
    /// heartbeat of the session, and the answer to it keeps the kill or lifts it.
    pub fn is_killed(&self, session: &str) -> bool {
        let s = &self.shared;
        if !s.killed.read().expect("kill list lock").contains(session) {
            return false;
        }
        let due = s
            .killed
            .write()
            .expect("kill list lock")
            .recheck_due(session, s.config.kill_recheck);
        if due {
            self.record(heartbeat(session));
        }
        true
    }

    pub fn stats(&self) -> &MeterStats {
        &self.shared.stats
    }

    /// Events held for delivery: waiting, or in the batch on the wire.
    pub fn queued(&self) -> usize {
        self.shared.queue.lock().expect("queue lock").outbox.held()
    }

    /// Sessions the proxy refuses calls of.
    pub fn killed_sessions(&self) -> usize {
        self.shared.killed.read().expect("kill list lock").len()
    }

    /// `GET /v1/guard/check`; fails open (and counts it) when it cannot be had in time.
    pub fn guard(&self, agent: Option<&str>, tool: &str, session: &str) -> GuardAnswer {
        let s = &self.shared;
        let mut request = s
            .agent
            .get(format!("{}/v1/guard/check", s.config.url))
            .header("X-API-Key", &s.config.api_key)
            .query("toolName", tool)
            .query("sessionId", session)
            .config()
            .timeout_global(Some(s.config.guard_timeout))
            .build();
        if let Some(agent) = agent {
            request = request.query("agentId", agent);
        }
        let answer = request
            .call()
            .ok()
            .filter(|a| a.status() == 200)
            .and_then(|mut a| a.body_mut().read_json::<Value>().ok());
        let Some(check) = answer else {
            s.stats.guard_fail_open.add(1);
            return GuardAnswer::Allow;
        };
        match check["action"].as_str() {
            Some("block") => GuardAnswer::Block(
                check["reason"]
                    .as_str()
                    .unwrap_or("margin below its floor")
                    .to_string(),
            ),
            Some("throttle") => GuardAnswer::Throttle(Duration::from_secs_f64(
                check["retryAfterSeconds"].as_f64().unwrap_or(1.0),
            )),
            _ => GuardAnswer::Allow,
        }
    }

    /// `POST /v1/authorize` for a paid call. A paid call never runs unauthorized: no answer is a
    /// refusal too.
    pub fn authorize(
        &self,
        nonce: &str,
        customer: &str,
        tool: &str,
        agent: Option<&str>,
        session: &str,
    ) -> Result<(), Refused> {
        let s = &self.shared;
        let mut body =
            json!({"nonce": nonce, "customerId": customer, "toolName": tool, "sessionId": session});
        if let Some(agent) = agent {
            body["agentId"] = json!(agent);
        }
        let answer = s
            .agent
            .post(format!("{}/v1/authorize", s.config.url))
            .header("X-API-Key", &s.config.api_key)
            .send_json(&body);
        let mut answer = answer.map_err(|e| Refused {
            message: format!(
                "{tool} could not be authorized (mcp-meter is unreachable: {e}); try again"
            ),
            terms: None,
        })?;
        let status = answer.status().as_u16();
        let body: Value = answer.body_mut().read_json().unwrap_or(Value::Null);
        match status {
            200 => Ok(()),
            402 => Err(Refused {
                message: format!(
                    "payment required for {tool}: {}",
                    body["message"].as_str().unwrap_or("refused")
                ),
                terms: Some(body),
            }),
            other => Err(Refused {
                message: format!(
                    "{tool} could not be authorized (mcp-meter answered {other}: {}); try again",
                    body["message"].as_str().unwrap_or("")
                ),
                terms: None,
            }),
        }
    }

    /// `POST /v1/authorize/{nonce}/release`: an authorized call did not run, so its reservation
    /// ends now instead of when it lapses. Blocks (tries again after no answer, 429 or 5xx):
    /// callers run it off their relays. Answers whether mcp-meter took it; one it never took is
    /// logged and counted, and the reservation lapses on its own.
    pub fn release(&self, nonce: &str) -> bool {
        let s = &self.shared;
        let url = format!(
            "{}/v1/authorize/{}/release",
            s.config.url,
            path_segment(nonce)
        );
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=RELEASE_ATTEMPTS {
            let answer = s
                .agent
                .post(&url)
                .header("X-API-Key", &s.config.api_key)
                .send_empty();
            let (status, why) = match answer {
                Ok(mut a) => {
                    let status = a.status().as_u16();
                    let body = a.body_mut().read_json::<Value>().unwrap_or(Value::Null);
                    (status, body["message"].to_string())
                }
                Err(e) => (0, e.to_string()),
            };
            match status {
                // 200: the reservation is over (or was already); 404: there never was one to end.
                200 | 404 => return true,
                0 | 429 | 500.. if attempt < RELEASE_ATTEMPTS => {
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
                _ => {
                    s.stats.releases_failed.add(1);
                    tracing::warn!(
                        nonce,
                        status,
                        error = why,
                        "release failed: the reservation lapses on its own"
                    );
                    return false;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Delivers what is queued, waiting at most until `deadline`, then stops the delivery
    /// thread. Answers how many events were left undelivered.
    pub fn close(&self, deadline: Instant) -> usize {
        self.shared.queue.lock().expect("queue lock").closing = Some(deadline);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            let _ = thread.join();
        }
        self.queued()
    }
}

/// `text` as one URL path segment: everything but unreserved characters percent-encoded.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The delivery thread: waits for a full batch or the interval, sends, retries, until closed.
/// One batch is on the wire at a time; it is out of the queue until its answer says what
/// became of it, so nothing recorded meanwhile (nor the bound) can touch it.
fn deliver(s: &Shared) {
    let mut backoff = Duration::ZERO;
    let mut not_before = Instant::now();
    // Taken off the queue: from here until `returned`, records and the bound see these events
    // as held but cannot drop them.
    while let Some(batch) = next_batch(s, not_before) {
        let span = tracing::info_span!("batch", events = batch.len());
        let _entered = span.enter();
        // Any answer, or none: a batch that may have been stored is never counted dropped.
        let answer = post(s, &batch);
        // Counted once, by its answer; a retry counts nothing but the retry.
        account(&s.stats, &s.killed, &batch, &answer);
        // Back at the front to go again with the same keys, or gone: answered.
        s.queue
            .lock()
            .expect("queue lock")
            .outbox
            .returned(batch, &answer);
        if let Answer::Retry { retry_after } = answer {
            backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
            not_before = Instant::now() + backoff.max(retry_after.unwrap_or_default());
        } else {
            backoff = Duration::ZERO;
            not_before = Instant::now();
        }
    }
}

/// Waits until a batch is due (full, the interval passed, or closing) and takes it off the
/// queue; `None` once closed and empty, or past the closing deadline.
fn next_batch(s: &Shared, not_before: Instant) -> Option<Vec<Value>> {
    let mut queue = s.queue.lock().expect("queue lock");
    let mut interval_end = Instant::now() + s.config.flush_interval;
    loop {
        let now = Instant::now();
        let waiting = queue.outbox.waiting();
        if let Some(deadline) = queue.closing {
            if waiting == 0 || now >= deadline {
                return None;
            }
        }
        if now >= interval_end && waiting == 0 {
            interval_end = now + s.config.flush_interval;
        }
        let due =
            queue.closing.is_some() || waiting >= s.config.max_batch_events || now >= interval_end;
        if due && now >= not_before && waiting > 0 {
            return Some(queue.outbox.take(s.config.max_batch_events));
        }
        let mut until = if now < not_before {
            not_before
        } else {
            interval_end
        };
        if let Some(deadline) = queue.closing {
            until = until.min(deadline);
        }
        let wait = until
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        queue = s.wake.wait_timeout(queue, wait).expect("queue lock").0;
    }
}

/// `POST /v1/ingest/batch` with `batch`, and what its answer means.
fn post(s: &Shared, batch: &[Value]) -> Answer {
    let answer = s
        .agent
        .post(format!("{}/v1/ingest/batch", s.config.url))
        .header("X-API-Key", &s.config.api_key)
        .send_json(json!({ "events": batch }));
    match answer {
        Ok(mut a) => {
            let retry_after = a
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .and_then(|v| Duration::try_from_secs_f64(v).ok());
            let status = a.status().as_u16();
            let body = a.body_mut().read_json::<Value>().unwrap_or(Value::Null);
            read_answer(status, retry_after, body, batch.len())
        }
        Err(e) => {
            tracing::warn!(error = %e, "mcp-meter unreachable; the batch is kept for retry");
            Answer::Retry { retry_after: None }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::search::{env_number, listing, shrink};

    /// One step of a delivery history, as the delivery thread and the calls live it.
    #[derive(Clone, Debug)]
    enum Op {
        /// A call's event is recorded.
        Record,
        /// The batch due goes on the wire (when none is on it and events wait).
        Send,
        /// The batch on the wire gets no answer (or 429, 5xx).
        Fail,
        /// The batch on the wire is answered 202, the events at these positions (modulo its
        /// length) refused.
        Accept(Vec<usize>),
        /// The batch on the wire is answered 400.
        Reject,
    }

    /// What became of an event, by the test's own bookkeeping.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fate {
        Waiting,
        OnWire,
        Acknowledged,
        Refused,
        Dropped,
    }

    /// The oracle: each event's fate and the waiting order, kept apart from `Outbox`.
    #[derive(Default)]
    struct Oracle {
        fates: Vec<Fate>,
        /// Waiting events, oldest first.
        order: VecDeque<usize>,
        wire: Vec<usize>,
    }

    impl Oracle {
        fn count(&self, fate: Fate) -> usize {
            self.fates.iter().filter(|f| **f == fate).count()
        }

        fn held(&self) -> usize {
            self.count(Fate::Waiting) + self.count(Fate::OnWire)
        }

        /// Moves event `e` from `from` to `to`, or says why it cannot.
        fn moves(&mut self, e: usize, from: Fate, to: Fate) -> Result<(), String> {
            match self.fates.get(e) {
                Some(f) if *f == from => {
                    self.fates[e] = to;
                    Ok(())
                }
                other => Err(format!(
                    "e{e} became {to:?} from {other:?} (only from {from:?})"
                )),
            }
        }
    }

    #[derive(Clone, Copy, Debug)]
    struct Bounds {
        max_events: usize,
        max_batch: usize,
    }

    fn key(e: usize) -> Value {
        json!({"idempotencyKey": format!("e{e}"), "sessionId": format!("s{}", e % 3)})
    }

    fn index(event: &Value) -> usize {
        event["idempotencyKey"].as_str().unwrap()[1..]
            .parse()
            .unwrap()
    }

    fn answer_to(op: &Op, batch: &[Value]) -> Answer {
        match op {
            Op::Fail => read_answer(0, None, Value::Null, batch.len()),
            Op::Reject => read_answer(400, None, json!({"message": "bad batch"}), batch.len()),
            Op::Accept(positions) => {
                let refused: HashSet<usize> = positions.iter().map(|p| p % batch.len()).collect();
                let errors: Vec<Value> = refused.iter().map(|i| json!({"index": i})).collect();
                read_answer(
                    202,
                    None,
                    json!({"accepted": batch.len() - refused.len(), "duplicates": 0,
                        "failed": refused.len(), "errors": errors, "killedSessionIds": []}),
                    batch.len(),
                )
            }
            Op::Record | Op::Send => unreachable!("not an answer"),
        }
    }

    /// Runs `ops` on an outbox, as the delivery loop drives it, then delivers what is left;
    /// checks every step against the oracle. `Err((step, what))` at the first difference.
    fn run(ops: &[Op], bounds: Bounds) -> Result<(), (usize, String)> {
        let mut outbox = Outbox::new(bounds.max_events);
        let stats = MeterStats::default();
        let kills = RwLock::new(Kills::new(10));
        let log = LogThrottle::new(Duration::from_secs(3600));
        let mut oracle = Oracle::default();
        let mut wire: Option<Vec<Value>> = None;
        // The ops, then as many sends and full acknowledgements as it takes to empty it.
        let drain = (0..2 * ops.len() + 2).flat_map(|_| [Op::Send, Op::Accept(Vec::new())]);
        for (step, op) in ops.iter().cloned().chain(drain).enumerate() {
            let fail = |what: String| (step.min(ops.len().saturating_sub(1)), what);
            match &op {
                Op::Record => {
                    let e = oracle.fates.len();
                    let full = oracle.held() >= bounds.max_events;
                    oracle.fates.push(Fate::Waiting);
                    oracle.order.push_back(e);
                    match hold(&mut outbox, &stats, &log, key(e)) {
                        None if full => {
                            return Err(fail(format!("e{e}: full, and nothing dropped")))
                        }
                        None => {}
                        Some(dropped) => {
                            let d = index(&dropped);
                            if !full {
                                return Err(fail(format!("dropped e{d} with room to spare")));
                            }
                            if oracle.fates[d] != Fate::Waiting {
                                return Err(fail(format!(
                                    "dropped e{d}, which is {:?}: only a waiting event may be dropped",
                                    oracle.fates[d]
                                )));
                            }
                            // The oldest waiting, or the new one when none other waits.
                            let oldest = oracle.order.pop_front().expect("e waits");
                            if d != oldest {
                                return Err(fail(format!(
                                    "dropped e{d}; the oldest waiting is e{oldest}"
                                )));
                            }
                            oracle
                                .moves(d, Fate::Waiting, Fate::Dropped)
                                .map_err(fail)?;
                        }
                    }
                }
                Op::Send => {
                    if wire.is_some() || outbox.waiting() == 0 {
                        continue;
                    }
                    let batch = outbox.take(bounds.max_batch);
                    let n = oracle.order.len().min(bounds.max_batch);
                    let expected: Vec<usize> = oracle.order.drain(..n).collect();
                    let got: Vec<usize> = batch.iter().map(index).collect();
                    if got != expected {
                        return Err(fail(format!(
                            "sent {got:?}; the oldest waiting are {expected:?}"
                        )));
                    }
                    for e in &expected {
                        oracle
                            .moves(*e, Fate::Waiting, Fate::OnWire)
                            .map_err(fail)?;
                    }
                    oracle.wire = expected;
                    wire = Some(batch);
                }
                Op::Fail | Op::Accept(_) | Op::Reject => {
                    let Some(batch) = wire.take() else { continue };
                    let answer = answer_to(&op, &batch);
                    account(&stats, &kills, &batch, &answer);
                    let on_wire = std::mem::take(&mut oracle.wire);
                    match &op {
                        Op::Fail => {
                            for e in on_wire.iter().rev() {
                                oracle
                                    .moves(*e, Fate::OnWire, Fate::Waiting)
                                    .map_err(fail)?;
                                oracle.order.push_front(*e);
                            }
                        }
                        Op::Reject => {
                            for e in &on_wire {
                                oracle
                                    .moves(*e, Fate::OnWire, Fate::Refused)
                                    .map_err(fail)?;
                            }
                        }
                        Op::Accept(positions) => {
                            let refused: HashSet<usize> =
                                positions.iter().map(|p| p % on_wire.len()).collect();
                            for (i, e) in on_wire.iter().enumerate() {
                                let to = if refused.contains(&i) {
                                    Fate::Refused
                                } else {
                                    Fate::Acknowledged
                                };
                                oracle.moves(*e, Fate::OnWire, to).map_err(fail)?;
                            }
                        }
                        _ => unreachable!(),
                    }
                    outbox.returned(batch, &answer);
                }
            }
            let counted = (
                stats.events_sent.get() as usize,
                stats.events_failed.get() as usize,
                stats.events_dropped.get() as usize,
                outbox.held(),
            );
            let expected = (
                oracle.count(Fate::Acknowledged),
                oracle.count(Fate::Refused),
                oracle.count(Fate::Dropped),
                oracle.held(),
            );
            if counted != expected {
                return Err(fail(format!(
                    "(sent, failed, dropped, held) counted {counted:?}, the oracle says {expected:?} after {op:?}"
                )));
            }
            if outbox.held() > bounds.max_events {
                return Err(fail(format!("{} held, over the bound", outbox.held())));
            }
        }
        if oracle.held() > 0 || outbox.held() > 0 {
            let lost: Vec<usize> = (0..oracle.fates.len())
                .filter(|e| matches!(oracle.fates[*e], Fate::Waiting | Fate::OnWire))
                .collect();
            return Err((
                ops.len().saturating_sub(1),
                format!(
                    "never delivered: the outbox holds {}, the oracle says {lost:?} wait",
                    outbox.held()
                ),
            ));
        }
        Ok(())
    }

    fn generate(seed: u64, steps: usize) -> (Bounds, Vec<Op>) {
        let mut state = seed | 1;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        let bounds = Bounds {
            max_events: 1 + next(6),
            max_batch: 1 + next(4),
        };
        let ops = (0..steps)
            .map(|_| match next(10) {
                0..=3 => Op::Record,
                4 | 5 => Op::Send,
                6 => Op::Fail,
                7 | 8 => Op::Accept((0..next(3)).map(|_| next(8)).collect()),
                _ => Op::Reject,
            })
            .collect();
        (bounds, ops)
    }

    /// Seeded random histories of records, sends, failures and answers: every event recorded
    /// is acknowledged, refused, dropped while waiting (counted), or still held; never lost,
    /// never counted twice; retries resend the same events first; the bound holds. Replay a
    /// seed with `MCP_METER_TEST_OUTBOX_SEED`; `MCP_METER_TEST_OUTBOX_RUNS` and
    /// `MCP_METER_TEST_OUTBOX_STEPS` make the search longer.
    #[test]
    fn every_event_recorded_is_delivered_refused_dropped_while_waiting_or_held() {
        let first = env_number("MCP_METER_TEST_OUTBOX_SEED", now_ms() as u64);
        let runs = env_number("MCP_METER_TEST_OUTBOX_RUNS", 300);
        let steps = env_number("MCP_METER_TEST_OUTBOX_STEPS", 200) as usize;
        println!("outbox model: seeds {first}.. ({runs} runs of {steps} steps; replay one with MCP_METER_TEST_OUTBOX_SEED=<seed> MCP_METER_TEST_OUTBOX_RUNS=1)");
        for seed in (0..runs).map(|r| first.wrapping_add(r)) {
            let (bounds, ops) = generate(seed, steps);
            if run(&ops, bounds).is_ok() {
                continue;
            }
            let failure = run(&ops, bounds).expect_err("it failed");
            let (short, (step, what)) = shrink(ops, failure, |ops| run(ops, bounds));
            panic!(
                "outbox model, seed {seed}, {bounds:?}: {} steps reproduce it, failing at step {step}:\n{}\n{what}",
                short.len(),
                listing(&short)
            );
        }
    }

    #[test]
    fn a_full_outbox_whose_every_event_is_on_the_wire_drops_the_new_one() {
        let mut outbox = Outbox::new(2);
        assert!(outbox.push(key(0)).is_none());
        assert!(outbox.push(key(1)).is_none());
        let batch = outbox.take(5);
        assert_eq!(batch.len(), 2);
        assert_eq!(outbox.push(key(2)).as_ref().map(index), Some(2));
        outbox.put_back(batch);
        assert_eq!(outbox.take(5).iter().map(index).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn answers_are_read_as_retry_acknowledged_or_refused() {
        let wait = Some(Duration::from_secs(2));
        for status in [0, 429, 500, 503] {
            assert_eq!(
                read_answer(status, wait, Value::Null, 3),
                Answer::Retry { retry_after: wait }
            );
        }
        let body = json!({"accepted": 1, "duplicates": 0, "failed": 1,
            "errors": [{"index": 1, "message": "bad"}], "killedSessionIds": ["s1", 7]});
        assert_eq!(
            read_answer(202, None, body, 2),
            Answer::Acknowledged {
                refused: 1,
                errors: json!([{"index": 1, "message": "bad"}]),
                killed: Some(vec!["s1".into()]),
            }
        );
        // A 202 is durable: what its body cannot tell counts as acknowledged, never as more
        // refusals than the batch had events.
        let Answer::Acknowledged {
            refused, killed, ..
        } = read_answer(202, None, Value::Null, 2)
        else {
            panic!("a 202 is acknowledged")
        };
        assert_eq!(refused, 0);
        assert_eq!(killed, None, "an unreadable body says nothing of kills");
        let Answer::Acknowledged { refused, .. } = read_answer(202, None, json!({"failed": 9}), 2)
        else {
            panic!("a 202 is acknowledged")
        };
        assert_eq!(refused, 2);
        assert_eq!(
            read_answer(401, None, json!({"message": "no key"}), 2),
            Answer::Refused {
                status: 401,
                message: json!("no key")
            }
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_202_without_a_kill_list_changes_no_kill() {
        let (stats, kills) = (MeterStats::default(), RwLock::new(Kills::new(10)));
        let batch = [json!({"sessionId": "a"})];
        let answer = |body: Value| read_answer(202, None, body, 1);
        let killed = |kills: &RwLock<Kills>| kills.read().unwrap().contains("a");
        account(
            &stats,
            &kills,
            &batch,
            &answer(json!({"killedSessionIds": ["a"]})),
        );
        assert!(killed(&kills));
        for unreadable in [
            Value::Null,
            json!({"accepted": 1}),
            json!({"killedSessionIds": 1}),
        ] {
            account(&stats, &kills, &batch, &answer(unreadable.clone()));
            assert!(killed(&kills), "{unreadable} lifted the kill");
        }
        account(
            &stats,
            &kills,
            &batch,
            &answer(json!({"killedSessionIds": []})),
        );
        assert!(
            !killed(&kills),
            "an answer naming the session and not listing it lifts it"
        );
        assert_eq!(stats.events_sent.get(), 5);
    }

    #[test]
    fn an_answer_speaks_only_for_the_sessions_its_batch_named() {
        let mut kills = Kills::new(10);
        kills.merge(["a", "b"].into_iter(), &names(&["a"]));
        assert!(kills.contains("a") && !kills.contains("b"));
        // An answer for a batch of another session lists no kill: `a` stays killed.
        kills.merge(["c"].into_iter(), &[]);
        assert!(kills.contains("a"));
        // `a` named again and not listed: its kill is over (its limit's window ended).
        kills.merge(["a", "c"].into_iter(), &names(&["c"]));
        assert!(!kills.contains("a") && kills.contains("c"));
        // A server that lists every kill of the tenant: each is a kill all the same.
        kills.merge(["c"].into_iter(), &names(&["c", "x", "y"]));
        assert!(["c", "x", "y"].iter().all(|s| kills.contains(s)));
        assert_eq!(kills.len(), 3);
    }

    #[test]
    fn past_its_bound_the_kill_list_forgets_the_kill_listed_longest_ago() {
        let mut kills = Kills::new(2);
        kills.merge(std::iter::empty(), &names(&["a", "b"]));
        // `a` is listed again, so `b` is the one listed longest ago.
        kills.merge(std::iter::empty(), &names(&["a", "c"]));
        assert!(kills.contains("a") && kills.contains("c") && !kills.contains("b"));
        assert_eq!(kills.len(), 2);
    }

    #[test]
    fn a_nonce_is_one_path_segment() {
        assert_eq!(path_segment("3f1c-9a_b.~"), "3f1c-9a_b.~");
        assert_eq!(path_segment("a/b c%?"), "a%2Fb%20c%25%3F");
    }
}
