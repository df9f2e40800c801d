//! The API's families: events by outcome, requests by route and status, request latency, and
//! the guard state's unreachable moments.

use backends::metrics::{head, single, Counter, Histogram};
use schemas::credits::RefusalReason;
use std::fmt::Write;
use std::time::Duration;

/// HTTP status codes 100 to 599.
const STATUS_CODES: usize = 500;

/// The routes HTTP metrics are kept for, as the API registers them (each its own label);
/// a path no route matched counts as `other`.
pub const ROUTES: [&str; 25] = [
    "/v1/ingest/batch",
    "/v1/ingest/events",
    "/v1/guard/check",
    "/v1/guard/states",
    "/v1/authorize",
    "/v1/authorize/{nonce}/release",
    "/v1/customers/{customer_id}/credits",
    "/v1/customers/{customer_id}/balance",
    "/v1/portal/tokens",
    "/v1/exports/billing",
    "/analytics/mcp/revenue/by-tool",
    "/analytics/mcp/by-agent",
    "/analytics/mcp/by-customer",
    "/analytics/mcp/summary",
    "/analytics/mcp/sessions",
    "/analytics/mcp/sessions/{session_id}",
    "/analytics/mcp/timeseries",
    "/dashboard",
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "other",
];

/// The route label of a request, from the pattern of the route it matched (`None`: none did).
/// The dashboard's files count as `/dashboard`, Swagger UI's as `/docs`.
pub fn route_of(pattern: Option<&str>) -> usize {
    let label = match pattern {
        Some(p) if p.starts_with("/dashboard/") => "/dashboard",
        Some(p) if p.starts_with("/docs/") => "/docs",
        Some(p) => p,
        None => "other",
    };
    ROUTES
        .iter()
        .position(|r| *r == label)
        .unwrap_or(ROUTES.len() - 1)
}

/// What the API records.
pub struct ApiMetrics {
    pub ingest_events_accepted: Counter,
    pub ingest_events_duplicate: Counter,
    pub ingest_events_failed: Counter,
    /// Per route: request latency.
    http_latency: [Histogram; ROUTES.len()],
    /// Per route, per status code (100 to 599, at `status - 100`): requests. A counter for
    /// every code instead of a locked map, so that recording takes no lock on the hot path.
    http_requests: [[Counter; STATUS_CODES]; ROUTES.len()],
    pub guard_state_errors: Counter,
    /// Authorizations refused (402), by reason, in [`RefusalReason::ALL`]'s order.
    payment_refusals: [Counter; RefusalReason::ALL.len()],
}

pub static METRICS: ApiMetrics = ApiMetrics {
    ingest_events_accepted: Counter::new(),
    ingest_events_duplicate: Counter::new(),
    ingest_events_failed: Counter::new(),
    http_latency: [const { Histogram::new() }; ROUTES.len()],
    http_requests: [const { [const { Counter::new() }; STATUS_CODES] }; ROUTES.len()],
    guard_state_errors: Counter::new(),
    payment_refusals: [const { Counter::new() }; RefusalReason::ALL.len()],
};

impl ApiMetrics {
    /// Records one authorization answered 402.
    pub fn payment_refused(&self, reason: RefusalReason) {
        let i = RefusalReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        self.payment_refusals[i].add(1);
    }

    /// Records one answered HTTP request.
    pub fn http_request(&self, route: usize, status: u16, took: Duration) {
        self.http_latency[route].observe(took);
        if let Some(counter) = (status as usize)
            .checked_sub(100)
            .and_then(|i| self.http_requests[route].get(i))
        {
            counter.add(1);
        }
    }

    /// The API's families in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        head(
            out,
            "mcp_meter_ingest_events_total",
            "counter",
            "Events received by ingest, by outcome: accepted (stored), duplicate (key already stored), failed (refused)",
        );
        for (outcome, c) in [
            ("accepted", &self.ingest_events_accepted),
            ("duplicate", &self.ingest_events_duplicate),
            ("failed", &self.ingest_events_failed),
        ] {
            let _ = writeln!(
                out,
                "mcp_meter_ingest_events_total{{outcome=\"{outcome}\"}} {}",
                c.get()
            );
        }
        head(
            out,
            "mcp_meter_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status (ingest batches: 202 accepted, 429 overloaded, 503 unavailable)",
        );
        let answered = self
            .http_requests
            .iter()
            .enumerate()
            .flat_map(|(route, codes)| {
                codes
                    .iter()
                    .enumerate()
                    .map(move |(i, c)| ((route, i + 100), c.get()))
                    .filter(|(_, n)| *n > 0)
            });
        for ((route, status), n) in answered {
            let _ = writeln!(
                out,
                "mcp_meter_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                ROUTES[route]
            );
        }
        head(
            out,
            "mcp_meter_http_request_duration_seconds",
            "histogram",
            "Time from request to answer (the body of a streamed export excluded), by route",
        );
        for (route, h) in ROUTES.iter().zip(&self.http_latency) {
            if h.count() > 0 {
                h.write(
                    out,
                    "mcp_meter_http_request_duration_seconds",
                    &format!("route=\"{route}\""),
                );
            }
        }
        single(
            out,
            "mcp_meter_guard_state_errors_total",
            "counter",
            "Requests that could not reach the guard state (limits not enforced, checks failed open)",
            self.guard_state_errors.get(),
        );
        head(
            out,
            "mcp_meter_authorizations_refused_total",
            "counter",
            "Authorizations answered 402, by reason: no_credits, insufficient_balance, spend_cap, too_many_in_flight",
        );
        for (reason, c) in RefusalReason::ALL.iter().zip(&self.payment_refusals) {
            let _ = writeln!(
                out,
                "mcp_meter_authorizations_refused_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                c.get()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_map_to_a_bounded_set_of_routes() {
        assert_eq!(
            ROUTES[route_of(Some("/v1/ingest/batch"))],
            "/v1/ingest/batch"
        );
        assert_eq!(
            ROUTES[route_of(Some("/analytics/mcp/sessions/{session_id}"))],
            "/analytics/mcp/sessions/{session_id}"
        );
        assert_eq!(ROUTES[route_of(Some("/docs/{_:.*}"))], "/docs");
        assert_eq!(ROUTES[route_of(Some("/dashboard/{file:.*}"))], "/dashboard");
        assert_eq!(ROUTES[route_of(Some("/v1/unknown"))], "other");
        assert_eq!(ROUTES[route_of(None)], "other");
    }
}
