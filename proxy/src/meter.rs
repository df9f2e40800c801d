//! Delivery of the proxy's events to mcp-meter, the delivery rules the SDKs follow
//! (README, "Metering a server you cannot change"), spelled in Rust:
//! events wait in memory and go out in batches (`POST /v1/ingest/batch`) by size or interval,
//! from a thread of their own, so that no call waits on it; no answer, 429 and 5xx are retried
//! with the same events (the same keys) after a backoff that honours Retry-After; a full queue
//! drops its oldest event and counts it. Answers' `killedSessionIds` are kept for enforcement.
//! Authorizations and guard checks, which a call does wait for, are asked from the caller's
//! thread.

use serde_json::{json, Value};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct MeterConfig {
    /// mcp-meter's base URL.
    pub url: String,
    /// A key with the `ingest` scope.
    pub api_key: String,
    pub max_batch_events: usize,
    pub flush_interval: Duration,
    pub max_queue_events: usize,
    pub request_timeout: Duration,
    /// Longest wait for a guard check before the call goes on (fail open).
    pub guard_timeout: Duration,
}

/// What the proxy counts, for its `/metrics`.
#[derive(Debug, Default)]
pub struct MeterStats {
    pub events_sent: AtomicU64,
    pub events_failed: AtomicU64,
    pub events_dropped: AtomicU64,
    pub batches_retried: AtomicU64,
    pub guard_fail_open: AtomicU64,
    pub calls_refused: AtomicU64,
}

struct Shared {
    config: MeterConfig,
    agent: ureq::Agent,
    queue: Mutex<Queue>,
    wake: Condvar,
    killed: RwLock<HashSet<String>>,
    stats: MeterStats,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Value>,
    /// Set by `close`: deliver what is queued until then, then stop.
    closing: Option<Instant>,
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
            config,
            agent,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            killed: RwLock::new(HashSet::new()),
            stats: MeterStats::default(),
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
        let mut queue = self.shared.queue.lock().expect("queue lock");
        if queue.events.len() >= self.shared.config.max_queue_events {
            queue.events.pop_front();
            self.shared
                .stats
                .events_dropped
                .fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "mcp-meter proxy: the event queue is full ({} events); the oldest was dropped",
                self.shared.config.max_queue_events
            );
        }
        queue.events.push_back(event);
        if queue.events.len() >= self.shared.config.max_batch_events {
            self.shared.wake.notify_one();
        }
    }

    pub fn is_killed(&self, session: &str) -> bool {
        self.shared
            .killed
            .read()
            .expect("kill list lock")
            .contains(session)
    }

    pub fn stats(&self) -> &MeterStats {
        &self.shared.stats
    }

    pub fn queued(&self) -> usize {
        self.shared.queue.lock().expect("queue lock").events.len()
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
            s.stats.guard_fail_open.fetch_add(1, Ordering::Relaxed);
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

/// The delivery thread: waits for a full batch or the interval, sends, retries, until closed.
fn deliver(s: &Shared) {
    let mut backoff = Duration::ZERO;
    let mut not_before = Instant::now();
    loop {
        let batch: Vec<Value> = {
            let mut queue = s.queue.lock().expect("queue lock");
            let mut interval_end = Instant::now() + s.config.flush_interval;
            loop {
                let now = Instant::now();
                if let Some(deadline) = queue.closing {
                    if queue.events.is_empty() || now >= deadline {
                        return;
                    }
                }
                if now >= interval_end && queue.events.is_empty() {
                    interval_end = now + s.config.flush_interval;
                }
                let due = queue.closing.is_some()
                    || queue.events.len() >= s.config.max_batch_events
                    || now >= interval_end;
                if due && now >= not_before && !queue.events.is_empty() {
                    break;
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
            let n = queue.events.len().min(s.config.max_batch_events);
            queue.events.iter().take(n).cloned().collect()
        };
        let answer = s
            .agent
            .post(format!("{}/v1/ingest/batch", s.config.url))
            .header("X-API-Key", &s.config.api_key)
            .send_json(json!({ "events": batch }));
        let (status, retry_after, body) = match answer {
            Ok(mut a) => {
                let retry_after = a
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .map(Duration::from_secs_f64);
                let status = a.status().as_u16();
                (status, retry_after, a.body_mut().read_json::<Value>().ok())
            }
            Err(e) => {
                eprintln!(
                    "mcp-meter proxy: mcp-meter unreachable ({e}); {} events kept for retry",
                    batch.len()
                );
                (0, None, None)
            }
        };
        if status == 0 || status == 429 || status >= 500 {
            s.stats.batches_retried.fetch_add(1, Ordering::Relaxed);
            backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
            not_before = Instant::now() + backoff.max(retry_after.unwrap_or_default());
            continue;
        }
        backoff = Duration::ZERO;
        not_before = Instant::now();
        // Answered: the batch leaves the queue (events recorded meanwhile stay behind it).
        s.queue
            .lock()
            .expect("queue lock")
            .events
            .drain(..batch.len());
        let body = body.unwrap_or(Value::Null);
        if status == 202 {
            let count = |field: &str| body[field].as_u64().unwrap_or(0);
            s.stats
                .events_sent
                .fetch_add(count("accepted") + count("duplicates"), Ordering::Relaxed);
            s.stats
                .events_failed
                .fetch_add(count("failed"), Ordering::Relaxed);
            if count("failed") > 0 {
                eprintln!(
                    "mcp-meter proxy: mcp-meter refused events: {}",
                    body["errors"]
                );
            }
            if let Some(ids) = body["killedSessionIds"].as_array() {
                *s.killed.write().expect("kill list lock") = ids
                    .iter()
                    .filter_map(|id| id.as_str().map(str::to_string))
                    .collect();
            }
        } else {
            s.stats
                .events_failed
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            eprintln!(
                "mcp-meter proxy: mcp-meter answered {status} to {} events: {}",
                batch.len(),
                body["message"]
            );
        }
    }
}
