//! `mcp-meter proxy --stdio -- COMMAND ARGS…`: the stdio MCP server runs as a child; the
//! client's stdin goes to it and its stdout comes back, line by line and byte for byte, except
//! refused calls, which the proxy answers itself. The child's stderr passes through. When the
//! child exits the proxy delivers what is queued (bounded wait) and exits with its status. The
//! proxy's own lines go to stderr: stdout belongs to the protocol.

use crate::calls::{messages, tool_call, uuid, CallTracker};
use crate::enforce::{gate_call, Enforcement};
use crate::meter::Meter;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct StdioProxy {
    pub command: Vec<String>,
    pub rules: Enforcement,
    /// The payer of every call (stdio has no headers to name one per call).
    pub customer: Option<String>,
    /// Longest wait, after the child exits, for queued events to be delivered.
    pub close_wait: Duration,
}

impl StdioProxy {
    /// Relays until the child exits; answers its exit code.
    pub fn run(self, meter: &Arc<Meter>) -> std::io::Result<i32> {
        let (program, args) = self.command.split_first().ok_or_else(|| {
            std::io::Error::other("give the server's command after --, e.g. -- npx my-server")
        })?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| std::io::Error::other(format!("cannot start `{program}`: {e}")))?;
        let mut to_child = child.stdin.take().expect("piped");
        let from_child = child.stdout.take().expect("piped");
        let meter = meter.clone();
        let tracker = Arc::new(Mutex::new(CallTracker::default()));
        let to_client = Arc::new(Mutex::new(std::io::stdout()));
        // One session per child: stdio has no session id of its own.
        let session = uuid();

        let client_side = {
            let (meter, tracker, to_client) = (meter.clone(), tracker.clone(), to_client.clone());
            let (rules, customer) = (self.rules.clone(), self.customer.clone());
            std::thread::spawn(move || {
                let mut stdin = BufReader::new(std::io::stdin().lock());
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match stdin.read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let mut refusals = Vec::new();
                    if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                        let mut tracker = tracker.lock().expect("tracker lock");
                        let mut forward = Vec::new();
                        for message in messages(&value) {
                            let Some((_, tool)) = tool_call(message) else {
                                tracker.from_client(message, None);
                                forward.push(message.clone());
                                continue;
                            };
                            let agent = tracker.agent.clone();
                            match gate_call(
                                &meter,
                                &rules,
                                message,
                                &tool,
                                &session,
                                agent.as_deref(),
                                customer.as_deref(),
                            ) {
                                Ok(call) => {
                                    tracker.from_client(message, Some(call));
                                    forward.push(message.clone());
                                }
                                Err(answer) => refusals.push(answer),
                            }
                        }
                        if !refusals.is_empty() {
                            // Only what was admitted reaches the server.
                            line = match (&value, forward.len()) {
                                (_, 0) => Vec::new(),
                                (Value::Array(_), _) => to_line(&Value::Array(forward)),
                                _ => to_line(&forward[0]),
                            };
                        }
                    }
                    if !line.is_empty()
                        && (to_child.write_all(&line).is_err() || to_child.flush().is_err())
                    {
                        break;
                    }
                    if !refusals.is_empty() {
                        let answer = if refusals.len() == 1 {
                            refusals.remove(0)
                        } else {
                            Value::Array(refusals)
                        };
                        let mut out = to_client.lock().expect("stdout lock");
                        let _ = out.write_all(&to_line(&answer));
                        let _ = out.flush();
                    }
                }
                // The client is gone: closing the child's stdin asks it to exit.
                drop(to_child);
            })
        };
        // Detached: it ends with the client's stdin, or with the process.
        drop(client_side);

        let mut from_child = BufReader::new(from_child);
        let mut line = Vec::new();
        loop {
            line.clear();
            match from_child.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Ok(value) = serde_json::from_slice::<Value>(&line) {
                let mut tracker = tracker.lock().expect("tracker lock");
                for message in messages(&value) {
                    if let Some(done) = tracker.from_server(message) {
                        meter.record(done.event);
                    }
                }
            }
            let mut out = to_client.lock().expect("stdout lock");
            if out.write_all(&line).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        let status = child.wait()?;
        let left = meter.close(Instant::now() + self.close_wait);
        if left > 0 {
            eprintln!("mcp-meter proxy: {left} events were not delivered before exiting");
        }
        Ok(status.code().unwrap_or(1))
    }
}

fn to_line(value: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("a value serializes");
    line.push(b'\n');
    line
}
