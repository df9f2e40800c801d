//! The proxy's `/healthz` and `/metrics` (Prometheus text), on a port of their own: in stdio
//! mode stdout belongs to the protocol. A plain HTTP/1.1 responder on a thread: two GET paths.

use crate::meter::Meter;
use backends::metrics::single;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
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

/// The proxy's families, `mcp_meter_proxy_*`, in Prometheus text format.
pub fn metrics(meter: &Meter) -> String {
    let s = meter.stats();
    let mut out = String::new();
    for (name, help, counter) in [
        (
            "events_sent_total",
            "Events mcp-meter acknowledged",
            &s.events_sent,
        ),
        (
            "events_failed_total",
            "Events mcp-meter refused",
            &s.events_failed,
        ),
        (
            "events_dropped_total",
            "Events dropped while waiting because the queue was full",
            &s.events_dropped,
        ),
        (
            "batches_retried_total",
            "Batch deliveries retried (no answer, 429, 5xx)",
            &s.batches_retried,
        ),
        (
            "guard_fail_open_total",
            "Guard checks that failed or timed out: the call was forwarded",
            &s.guard_fail_open,
        ),
        (
            "calls_refused_total",
            "Calls answered by the proxy without reaching the server",
            &s.calls_refused,
        ),
        (
            "requests_refused_total",
            "Requests refused unforwarded: unparsable, too large, too slow, or a payer not believed",
            &s.requests_refused,
        ),
        (
            "answers_unread_total",
            "Answer events over --max-answer-bytes, passed on unread: their calls ended as unanswered",
            &s.answers_unread,
        ),
        (
            "releases_failed_total",
            "Releases of calls that did not run that mcp-meter never took: their reservations lapse",
            &s.releases_failed,
        ),
    ] {
        let name = format!("mcp_meter_proxy_{name}");
        single(&mut out, &name, "counter", help, counter.get());
    }
    single(
        &mut out,
        "mcp_meter_proxy_events_queued",
        "gauge",
        "Events held for delivery: waiting, or in the batch on the wire",
        meter.queued(),
    );
    single(
        &mut out,
        "mcp_meter_proxy_killed_sessions",
        "gauge",
        "Sessions whose calls the proxy refuses (killed by a hard limit)",
        meter.killed_sessions(),
    );
    out
}
