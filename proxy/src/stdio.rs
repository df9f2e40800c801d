//! `mcp-meter proxy --stdio -- COMMAND ARGS…`: the stdio MCP server runs as a child; the
//! client's stdin goes to it and its stdout comes back, line by line and byte for byte, except
//! refused calls, which the proxy answers itself. The child's stderr passes through. When the
//! child exits the proxy reports the calls left by the billing rule, delivers what is queued
//! (bounded wait) and exits with its status. The proxy's own lines go to stderr: stdout belongs
//! to the protocol.
//!
//! A client line the proxy cannot parse is answered with a parse error and never reaches the
//! child (`crate::wire`), and so is one over `max_line_bytes`; blank lines are dropped. A
//! child line over `max_answer_bytes` goes to the client as it comes, unread.
//!
//! The child→client relay never waits behind an admission: a call that must ask mcp-meter (the
//! guard, an authorization) is admitted on a thread of its own, and the calls' lock is held
//! only to note a call or an answer. The child's environment has no `MCP_METER_PROXY_*`
//! variable: the meter key is the proxy's, not the server's.

use crate::calls::{client_name, messages, uuid, CallTracker, Ended};
use crate::enforce::{id_in_use, Caller, Door};
use crate::wire;
use schemas::event::{fit_text, MAX_AGENT_ID_LEN};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The prefix of the proxy's own variables, which its child never sees.
pub const PROXY_ENV_PREFIX: &str = "MCP_METER_PROXY_";

pub struct StdioProxy {
    pub command: Vec<String>,
    /// The payer of every call (stdio has no headers to name one per call).
    pub customer: Option<String>,
    /// Longest wait, after the child exits, for queued events to be delivered.
    pub close_wait: Duration,
    /// The longest client line (one message or batch); a longer one is refused unforwarded.
    pub max_line_bytes: usize,
    /// The longest child line read for its results; a longer one passes unread.
    pub max_answer_bytes: usize,
}

/// What the two relays share.
struct Relay {
    door: Arc<Door>,
    calls: Mutex<CallTracker>,
    /// The child's stdin; taken (closed) when the client is gone.
    to_child: Mutex<Option<ChildStdin>>,
    to_client: Mutex<std::io::Stdout>,
    /// One session per child: stdio has no session id of its own.
    session: String,
    customer: Option<String>,
    /// The client's name, from `initialize` or a request's `_meta`.
    agent: Mutex<Option<String>>,
    /// Set when the client closed its stdin: calls left unanswered then were given up by it.
    client_gone: AtomicBool,
    /// Calls being admitted on threads of their own, and the signal that one finished.
    admitting: Mutex<usize>,
    admitted: std::sync::Condvar,
}

/// Calls admitted at once on threads of their own (each may wait on mcp-meter).
const MAX_ADMITTING: usize = 64;

impl Relay {
    fn lock_calls(&self) -> std::sync::MutexGuard<'_, CallTracker> {
        self.calls.lock().expect("calls lock")
    }

    fn write_child(&self, line: &[u8]) -> bool {
        let mut child = self.to_child.lock().expect("child stdin lock");
        child
            .as_mut()
            .is_some_and(|c| c.write_all(line).and_then(|()| c.flush()).is_ok())
    }

    fn write_client(&self, line: &[u8]) -> bool {
        let mut out = self.to_client.lock().expect("stdout lock");
        out.write_all(line).and_then(|()| out.flush()).is_ok()
    }

    fn caller(&self, message: &Value) -> Caller {
        let named = client_name(message).map(|name| fit_text(name, MAX_AGENT_ID_LEN).into_owned());
        let mut agent = self.agent.lock().expect("agent lock");
        if named.is_some() {
            agent.clone_from(&named);
        }
        Caller {
            session: self.session.clone(),
            agent: agent.clone(),
            customer: self.customer.clone(),
        }
    }

    /// Admits one call and forwards it, or answers the client the refusal.
    fn admit_and_forward(&self, message: &Value, tool: &str, who: &Caller) {
        match self.door.admit(message, tool, who) {
            Ok(call) => {
                let started = self.lock_calls().start(&message["id"], call);
                match started {
                    Ok(()) => {
                        if !self.write_child(&to_line(message)) {
                            self.never_delivered(&[message]);
                        }
                    }
                    Err((call, why)) => {
                        self.door.ended(Ended::NotRun(*call));
                        self.write_client(&to_line(&id_in_use(message, why)));
                    }
                }
            }
            Err(refusal) => {
                self.write_client(&to_line(&refusal));
            }
        }
    }

    /// The client side: each line is noted and forwarded; a call is admitted first.
    fn from_client(self: &Arc<Self>, mut line: Vec<u8>) -> bool {
        if line.iter().all(u8::is_ascii_whitespace) {
            return true;
        }
        let (value, bom) = match wire::read(&line) {
            Ok((value, forwarded)) => (value, line.len() - forwarded.len()),
            Err(error) => {
                self.door.meter.stats().requests_refused.add(1);
                return self.write_client(&to_line(&error));
            }
        };
        line.drain(..bom);
        match wire::tool_call(&value) {
            Ok(Some((_, tool))) => {
                let who = self.caller(&value);
                if self.door.asks_meter(tool) {
                    // At most MAX_ADMITTING at once: past it, the client's next line waits.
                    let mut admitting = self.admitting.lock().expect("admitting lock");
                    while *admitting >= MAX_ADMITTING {
                        admitting = self.admitted.wait(admitting).expect("admitting lock");
                    }
                    *admitting += 1;
                    drop(admitting);
                    let (relay, tool) = (self.clone(), tool.to_string());
                    std::thread::spawn(move || {
                        relay.admit_and_forward(&value, &tool, &who);
                        *relay.admitting.lock().expect("admitting lock") -= 1;
                        relay.admitted.notify_one();
                    });
                } else {
                    self.admit_and_forward(&value, tool, &who);
                }
                return true;
            }
            Err(invalid) => return self.write_client(&to_line(&invalid)),
            Ok(None) => {}
        }
        // A batch (2025-03-26) or any other message: in order, on this thread.
        let mut forward = Vec::new();
        let mut refusals = Vec::new();
        for message in messages(&value) {
            let (id, tool) = match wire::tool_call(message) {
                Ok(Some(call)) => call,
                Err(invalid) => {
                    refusals.push(invalid);
                    continue;
                }
                Ok(None) => {
                    // Another request: its id must not be a call's in flight, or its answer
                    // would end the call.
                    if let Err(why) = self.lock_calls().claim(message) {
                        refusals.push(id_in_use(message, why));
                        continue;
                    }
                    self.caller(message);
                    let cancelled = self.lock_calls().from_client(message);
                    if let Some(event) = cancelled {
                        self.door.ended(Ended::Report(event));
                    }
                    forward.push(message.clone());
                    continue;
                }
            };
            match self.door.admit(message, tool, &self.caller(message)) {
                Ok(call) => {
                    let started = self.lock_calls().start(id, call);
                    match started {
                        Ok(()) => forward.push(message.clone()),
                        Err((call, why)) => {
                            self.door.ended(Ended::NotRun(*call));
                            refusals.push(id_in_use(message, why));
                        }
                    }
                }
                Err(answer) => refusals.push(answer),
            }
        }
        let line = match (&value, refusals.is_empty(), forward.len()) {
            (_, true, _) => line,
            (_, false, 0) => Vec::new(),
            (Value::Array(_), false, _) => to_line(&Value::Array(forward.clone())),
            _ => to_line(&forward[0]),
        };
        if !refusals.is_empty() {
            let answer = if refusals.len() == 1 && !value.is_array() {
                refusals.remove(0)
            } else {
                Value::Array(refusals)
            };
            self.write_client(&to_line(&answer));
        }
        if line.is_empty() || self.write_child(&line) {
            return true;
        }
        let sent: Vec<&Value> = forward.iter().collect();
        self.never_delivered(&sent);
        false
    }

    /// Calls whose request never reached the child did not run: they are released, not billed.
    fn never_delivered(&self, requests: &[&Value]) {
        for request in requests {
            if let Ok(Some(_)) = wire::tool_call(request) {
                let call = self.lock_calls().take(&request["id"]);
                if let Some(call) = call {
                    self.door.ended(Ended::NotRun(call));
                }
            }
        }
    }
}

impl StdioProxy {
    /// Relays until the child exits; answers its exit code.
    pub fn run(self, door: Arc<Door>) -> std::io::Result<i32> {
        let (program, args) = self.command.split_first().ok_or_else(|| {
            std::io::Error::other("give the server's command after --, e.g. -- npx my-server")
        })?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with(PROXY_ENV_PREFIX) {
                command.env_remove(name);
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| std::io::Error::other(format!("cannot start `{program}`: {e}")))?;
        let relay = Arc::new(Relay {
            door: door.clone(),
            calls: Mutex::new(CallTracker::default()),
            to_child: Mutex::new(child.stdin.take()),
            to_client: Mutex::new(std::io::stdout()),
            session: uuid(),
            customer: self.customer,
            agent: Mutex::new(None),
            client_gone: AtomicBool::new(false),
            admitting: Mutex::new(0),
            admitted: std::sync::Condvar::new(),
        });
        let from_child = child.stdout.take().expect("piped");

        {
            let relay = relay.clone();
            let max_line = self.max_line_bytes;
            // Detached: it ends with the client's stdin, or with the process.
            std::thread::spawn(move || {
                let mut stdin = BufReader::new(std::io::stdin().lock());
                let mut line = Vec::new();
                loop {
                    let carry_on = match read_line(&mut stdin, &mut line, max_line, &mut |_| true) {
                        Ok(Line::Whole) => relay.from_client(std::mem::take(&mut line)),
                        Ok(Line::TooLong) => {
                            relay.door.meter.stats().requests_refused.add(1);
                            relay.write_client(&to_line(&wire::too_large(max_line)))
                        }
                        Ok(Line::End) | Err(_) => false,
                    };
                    if !carry_on {
                        break;
                    }
                }
                // The client is gone: closing the child's stdin asks it to exit.
                relay.client_gone.store(true, Ordering::Relaxed);
                relay.to_child.lock().expect("child stdin lock").take();
            });
        }
        {
            let relay = Arc::downgrade(&relay);
            // Calls past the call timeout, and input rounds nobody came back to.
            std::thread::spawn(move || {
                while let Some(relay) = relay.upgrade() {
                    relay.door.end_overdue(&mut relay.lock_calls());
                    relay.door.expire_waiting();
                    drop(relay);
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }

        let mut from_child = BufReader::new(from_child);
        let mut line = Vec::new();
        loop {
            // A line too long to read goes on to the client as it comes.
            let read = read_line(
                &mut from_child,
                &mut line,
                self.max_answer_bytes,
                &mut |bytes| relay.write_client(bytes),
            );
            match read {
                Ok(Line::Whole) => {}
                Ok(Line::TooLong) => continue,
                Ok(Line::End) | Err(_) => break,
            }
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                let mut calls = relay.lock_calls();
                for message in messages(&value) {
                    door.from_server(&mut calls, message);
                }
            }
            if !relay.write_client(&line) {
                break;
            }
        }
        let status = child.wait()?;
        // Calls the child never answered: given up by the client, or lost with the server.
        let left = if relay.client_gone.load(Ordering::Relaxed) {
            "CANCELLED"
        } else {
            "ERROR"
        };
        door.end_all(&mut relay.lock_calls(), left);
        // Rounds waiting for the client's input: its one client is gone with the child.
        door.end_waiting("CANCELLED");
        let undelivered = door.meter.close(Instant::now() + self.close_wait);
        if undelivered > 0 {
            tracing::warn!(undelivered, "events were not delivered before exiting");
        }
        Ok(status.code().unwrap_or(1))
    }
}

enum Line {
    /// A line, with its newline (the last one may have none), is in the buffer.
    Whole,
    /// The line was longer than allowed: it went to the spill, not the buffer.
    TooLong,
    /// The input ended (or the spill refused more).
    End,
}

/// Reads one line into `line` (cleared first), holding at most `max` bytes of it: a longer
/// line is handed to `spill` as it comes, held bytes first, up to and with its newline. `spill`
/// answers whether to go on.
fn read_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
    spill: &mut dyn FnMut(&[u8]) -> bool,
) -> std::io::Result<Line> {
    line.clear();
    let mut spilling = false;
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            return Ok(match (spilling, line.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::End,
                (false, false) => Line::Whole,
            });
        }
        let (piece, ends) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (&available[..=at], true),
            None => (available, false),
        };
        let taken = piece.len();
        if !spilling && line.len() + taken > max {
            spilling = true;
            if !spill(line) {
                return Ok(Line::End);
            }
            line.clear();
        }
        if spilling {
            if !spill(piece) {
                return Ok(Line::End);
            }
        } else {
            line.extend_from_slice(piece);
        }
        input.consume(taken);
        if ends {
            return Ok(if spilling { Line::TooLong } else { Line::Whole });
        }
    }
}

fn to_line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("a value serializes");
    line.push(b'\n');
    line
}
