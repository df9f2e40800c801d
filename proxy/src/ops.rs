//! The proxy's `/healthz` and `/metrics` (Prometheus text), on a port of their own: in stdio
//! mode stdout belongs to the protocol. A plain HTTP/1.1 responder on a thread: two GET paths.

use crate::meter::Meter;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Serves `/healthz` and `/metrics` on `listener` from a thread of its own.
pub fn serve(listener: TcpListener, meter: Arc<Meter>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Drain the headers; the paths take no body.
            let mut header = String::new();
            while reader
                .read_line(&mut header)
                .map(|n| n > 2)
                .unwrap_or(false)
            {
                header.clear();
            }
            let path = request_line.split(' ').nth(1).unwrap_or("");
            let (status, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_string()),
                "/metrics" => ("200 OK", metrics(&meter)),
                _ => ("404 Not Found", "GET /healthz or /metrics\n".to_string()),
            };
            let mut stream = &stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// The proxy's counters, `mcp_meter_proxy_*`.
pub fn metrics(meter: &Meter) -> String {
    let s = meter.stats();
    let mut out = String::new();
    for (name, help, value) in [
        (
            "events_sent_total",
            "Events mcp-meter acknowledged",
            s.events_sent.load(Ordering::Relaxed),
        ),
        (
            "events_failed_total",
            "Events mcp-meter refused",
            s.events_failed.load(Ordering::Relaxed),
        ),
        (
            "events_dropped_total",
            "Events dropped because the queue was full",
            s.events_dropped.load(Ordering::Relaxed),
        ),
        (
            "batches_retried_total",
            "Batch deliveries retried (no answer, 429, 5xx)",
            s.batches_retried.load(Ordering::Relaxed),
        ),
        (
            "guard_fail_open_total",
            "Guard checks that failed or timed out: the call was forwarded",
            s.guard_fail_open.load(Ordering::Relaxed),
        ),
        (
            "calls_refused_total",
            "Calls answered by the proxy without reaching the server",
            s.calls_refused.load(Ordering::Relaxed),
        ),
    ] {
        out += &format!("# HELP mcp_meter_proxy_{name} {help}\n# TYPE mcp_meter_proxy_{name} counter\nmcp_meter_proxy_{name} {value}\n");
    }
    out += &format!(
        "# HELP mcp_meter_proxy_events_queued Events waiting for delivery\n# TYPE mcp_meter_proxy_events_queued gauge\nmcp_meter_proxy_events_queued {}\n",
        meter.queued()
    );
    out
}
