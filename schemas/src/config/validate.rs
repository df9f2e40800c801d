//! [`Config::validate`]: one check per section, each adding what it finds to one list, so that a
//! config is reported whole. Each problem names its setting and says what to write instead.

use super::{
    AggregatorConfig, ClickHouseConfig, Config, ConfigError, IngestConfig, KafkaConfig,
    MarginGuardConfig, RetentionConfig, SqliteConfig, TenantConfig, MAX_LIMIT,
};
use crate::rating::{RatePlan, DEFAULT_TOOL};
use std::collections::HashSet;
use std::net::SocketAddr;

type Problems = Vec<String>;

impl Config {
    /// Checks everything at once and reports every problem found, each saying what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::new();
        let p = &mut problems;
        if let Err(e) = listen_addresses(&self.listen) {
            p.push(format!("listen {e}"));
        }
        ingest(&self.ingest, p);
        sqlite(&self.sqlite, p);
        clickhouse(&self.clickhouse, p);
        kafka(&self.kafka, p);
        aggregator(&self.aggregator, &self.kafka, p);
        retention(&self.retention, &self.ingest, p);
        margin_guard(&self.margin_guard, p);
        at_least_one(
            "credits",
            &[
                ("reservation_seconds", self.credits.reservation_seconds),
                ("charged_keys_hours", self.credits.charged_keys_hours),
                ("rebuild_wait_ms", self.credits.rebuild_wait_ms),
            ],
            p,
        );
        if let Some(secret) = &self.portal.secret {
            if let Err(e) = crate::token::check_secret(secret) {
                p.push(format!("portal.secret {e}"));
            }
        }
        http(&self.http, p);
        rate_limits(&self.rate_limits, p);
        tenants(&self.tenants, p);
        ConfigError::of(problems)
    }
}

fn http(h: &super::HttpConfig, p: &mut Problems) {
    at_least_one(
        "http",
        &[
            ("body_timeout_ms", h.body_timeout_ms),
            ("max_small_body_bytes", h.max_small_body_bytes as u64),
        ],
        p,
    );
    if let Some(metrics) = &h.metrics_listen {
        if let Err(e) = listen_addresses(metrics) {
            p.push(format!("http.metrics_listen {e}"));
        }
    }
}

fn rate_limits(r: &super::RateLimitsConfig, p: &mut Problems) {
    for (who, per_second, burst) in [
        ("key", r.key_requests_per_second, r.key_burst),
        ("portal", r.portal_requests_per_second, r.portal_burst),
    ] {
        if !(per_second > 0.0 && per_second <= 1e6) {
            p.push(format!(
                "rate_limits.{who}_requests_per_second must be above 0 and at most 1000000 (got {per_second})"
            ));
        }
        if burst == 0 {
            p.push(format!("rate_limits.{who}_burst must be at least 1"));
        }
    }
}

/// Each named setting must be at least 1.
fn at_least_one(section: &str, settings: &[(&str, u64)], p: &mut Problems) {
    for (name, value) in settings {
        if *value == 0 {
            p.push(format!("{section}.{name} must be at least 1"));
        }
    }
}

fn ingest(i: &IngestConfig, p: &mut Problems) {
    if i.max_batch_events == 0 || i.max_batch_events > crate::event::MAX_BATCH_EVENTS {
        p.push(format!(
            "ingest.max_batch_events must be 1 to {} (got {})",
            crate::event::MAX_BATCH_EVENTS,
            i.max_batch_events
        ));
    }
    if i.max_body_bytes < 1024 {
        p.push(format!(
            "ingest.max_body_bytes must be at least 1024 (got {})",
            i.max_body_bytes
        ));
    }
    at_least_one(
        "ingest",
        &[
            ("max_in_flight_requests", i.max_in_flight_requests as u64),
            ("max_event_age_days", i.max_event_age_days.into()),
        ],
        p,
    );
}

fn sqlite(s: &SqliteConfig, p: &mut Problems) {
    at_least_one(
        "sqlite",
        &[
            ("max_commit_events", s.max_commit_events as u64),
            ("queue_capacity_batches", s.queue_capacity_batches as u64),
            ("read_connections", s.read_connections as u64),
        ],
        p,
    );
}

fn clickhouse(ch: &ClickHouseConfig, p: &mut Problems) {
    if !(ch.url.starts_with("http://") || ch.url.starts_with("https://")) {
        p.push(format!(
            "clickhouse.url `{}` must be an http:// or https:// URL of the HTTP interface",
            ch.url
        ));
    }
    let identifier = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !identifier(&ch.database) {
        p.push(format!(
            "clickhouse.database `{}` must be letters, digits and `_`, not starting with a digit",
            ch.database
        ));
    }
    at_least_one(
        "clickhouse",
        &[("request_timeout_ms", ch.request_timeout_ms)],
        p,
    );
}

fn kafka(k: &KafkaConfig, p: &mut Problems) {
    if k.brokers.as_deref().is_some_and(|b| b.trim().is_empty()) {
        p.push("kafka.brokers is empty; give host:port of at least one broker".into());
    }
    if k.partitions < 1 || k.replication_factor < 1 {
        p.push("kafka.partitions and kafka.replication_factor must be at least 1".into());
    }
    if k.events_topic.is_empty() || k.events_topic == k.dead_letter_topic {
        p.push("kafka.events_topic and kafka.dead_letter_topic must be two different names".into());
    }
    at_least_one(
        "kafka",
        &[("delivery_timeout_ms", k.delivery_timeout_ms)],
        p,
    );
}

fn aggregator(a: &AggregatorConfig, k: &KafkaConfig, p: &mut Problems) {
    if let Err(e) = listen_addresses(&a.listen) {
        p.push(format!("aggregator.listen {e}"));
    }
    if a.max_batch_rows == 0 || a.max_batch_wait_ms == 0 {
        p.push(
            "aggregator.max_batch_rows and aggregator.max_batch_wait_ms must be at least 1".into(),
        );
    }
    if a.lag_check_interval_ms == 0 || a.lag_check_interval_ms >= a.stall_timeout_ms {
        p.push(format!(
            "aggregator.lag_check_interval_ms ({}) must be at least 1 and below aggregator.stall_timeout_ms ({})",
            a.lag_check_interval_ms, a.stall_timeout_ms
        ));
    }
    if a.stall_timeout_ms <= k.session_timeout_ms {
        p.push(format!(
            "aggregator.stall_timeout_ms ({}) must be longer than kafka.session_timeout_ms ({}): \
a group needs that long to notice a crashed member, and a shorter stall timeout would rejoin during every normal rebalance",
            a.stall_timeout_ms, k.session_timeout_ms
        ));
    }
}

fn retention(r: &RetentionConfig, i: &IngestConfig, p: &mut Problems) {
    if r.dedup_days < i.max_event_age_days {
        p.push(format!(
            "retention.dedup_days ({}) must be at least ingest.max_event_age_days ({}): \
a retry of an event ingest still accepts must still find its key",
            r.dedup_days, i.max_event_age_days
        ));
    }
    if let Some(raw) = r.raw_days.filter(|raw| *raw < r.dedup_days) {
        p.push(format!(
            "retention.raw_days ({raw}) must be at least retention.dedup_days ({}): \
in the embedded store a raw row is its own dedup key; leave raw_days out to keep raw rows",
            r.dedup_days
        ));
    }
    at_least_one("retention", &[("interval_seconds", r.interval_seconds)], p);
}

fn margin_guard(g: &MarginGuardConfig, p: &mut Problems) {
    at_least_one(
        "margin_guard",
        &[("interval_seconds", g.interval_seconds)],
        p,
    );
    if !(1..=crate::analytics::MAX_RANGE_DAYS as u32).contains(&g.window_days) {
        p.push(format!(
            "margin_guard.window_days must be 1 to {} (got {})",
            crate::analytics::MAX_RANGE_DAYS,
            g.window_days
        ));
    }
}

/// Every tenant: a unique id, keys (unique, with scopes), plans that price every tool, limits
/// within range, thresholds in order.
fn tenants(tenants: &[TenantConfig], p: &mut Problems) {
    let mut tenant_ids = HashSet::new();
    let mut key_hashes = HashSet::new();
    for (n, t) in tenants.iter().enumerate() {
        let at = format!("tenants[{n}] (`{}`)", t.id);
        if !valid_tenant_id(&t.id) {
            p.push(format!(
                "{at}: id must be 1 to 64 letters, digits, `_`, `-` or `.`"
            ));
        }
        if !tenant_ids.insert(t.id.as_str()) {
            p.push(format!("{at}: id is used by another tenant"));
        }
        if t.api_keys.is_empty() {
            p.push(format!("{at}: has no api_keys, so nobody can use it"));
        }
        for (k, key) in t.api_keys.iter().enumerate() {
            let kat = format!("{at}.api_keys[{k}] (`{}`)", key.name);
            let hex_ok = key.sha256.len() == 64
                && key
                    .sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex_ok {
                p.push(format!(
                    "{kat}: sha256 must be 64 lower-case hex digits (`mcp-meter keys new` prints one)"
                ));
            } else if !key_hashes.insert(key.sha256.as_str()) {
                p.push(format!("{kat}: the same key is configured twice"));
            }
            if key.scopes.is_empty() {
                p.push(format!(
                    "{kat}: scopes is empty; give at least one of ingest, read, export, admin"
                ));
            }
            if let Some(r) = key.rate_limit {
                if !(r.requests_per_second > 0.0 && r.requests_per_second <= 1e6) || r.burst == 0 {
                    p.push(format!(
                        "{kat}: rate_limit needs requests_per_second above 0 (at most 1000000) and a burst of at least 1"
                    ));
                }
            }
        }
        for (l, limit) in t.limits.iter().enumerate() {
            let lat = format!("{at}.limits[{l}]");
            if limit.max_calls.is_none() && limit.max_spend_micros.is_none() {
                p.push(format!("{lat}: set max_calls, max_spend_micros or both"));
            }
            for (name, value) in [
                ("max_calls", limit.max_calls),
                ("max_spend_micros", limit.max_spend_micros),
            ] {
                if value.is_some_and(|v| !(1..=MAX_LIMIT).contains(&v)) {
                    p.push(format!("{lat}: {name} must be 1 to {MAX_LIMIT}"));
                }
            }
        }
        for (c, cap) in t.customer_caps.iter().enumerate() {
            if !(1..=MAX_LIMIT).contains(&cap.max_spend_micros) {
                p.push(format!(
                    "{at}.customer_caps[{c}]: max_spend_micros must be 1 to {MAX_LIMIT}"
                ));
            }
        }
        if t.max_tool_names == 0 {
            p.push(format!(
                "{at}: max_tool_names must be at least 1 (default 1000)"
            ));
        }
        if t.max_in_flight_per_customer == Some(0) {
            p.push(format!(
                "{at}: max_in_flight_per_customer must be at least 1 (leave it out for no limit)"
            ));
        }
        if let Err(e) = t.margin_guard.thresholds() {
            p.push(format!("{at}: {e}"));
        }
        rate_plans(&at, &t.rate_plans, p);
    }
}

/// A tenant's plans: at least one, versions unique from 1, starting in version order, each with
/// a `"*"` rate for the tools it does not name.
fn rate_plans(at: &str, plans: &[RatePlan], p: &mut Problems) {
    if plans.is_empty() {
        p.push(format!(
            "{at}: has no rate_plans; events could not be priced"
        ));
    }
    let mut versions = HashSet::new();
    for plan in plans {
        let pat = format!("{at}.rate_plans version {}", plan.version);
        if plan.version == 0 {
            p.push(format!("{pat}: versions start at 1 (0 marks heartbeats)"));
        }
        if !versions.insert(plan.version) {
            p.push(format!("{pat}: version is used twice"));
        }
        if !plan.tools.contains_key(DEFAULT_TOOL) {
            p.push(format!(
                "{pat}: has no `\"*\"` tool rate for tools it does not name"
            ));
        }
        for name in plan.tools.keys() {
            if name.encode_utf16().count() > crate::event::MAX_TOOL_NAME_LEN {
                p.push(format!("{pat}: tool `{name}` is longer than 64 characters"));
            }
        }
    }
    let mut ordered: Vec<&RatePlan> = plans.iter().collect();
    ordered.sort_by_key(|plan| plan.version);
    for pair in ordered.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let starts = |plan: &RatePlan| plan.effective_from.map(|t| t.timestamp_millis());
        if starts(b).unwrap_or(i64::MIN) <= starts(a).unwrap_or(i64::MIN) {
            p.push(format!(
                "{at}.rate_plans: version {} must start (effective_from) after version {}",
                b.version, a.version
            ));
        }
    }
}

fn valid_tenant_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The addresses a `listen` setting stands for: `127.0.0.1:8080`, `[::1]:8080`, or a host name
/// that resolves, as `localhost:8080`. `Err` says what is wrong with it.
pub fn listen_addresses(listen: &str) -> Result<Vec<SocketAddr>, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = listen.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(format!(
            "`{listen}` has no port: write host:port, like 127.0.0.1:8080 or localhost:8080"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "`{listen}` is not host:port, like 127.0.0.1:8080 or localhost:8080"
        ));
    }
    match listen.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(format!("`{listen}`: host `{host}` resolves to no address"))
            } else {
                Ok(addrs)
            }
        }
        Err(e) => Err(format!("`{listen}`: host `{host}` does not resolve ({e})")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::guard::MarginThresholds;

    const GOOD: &str = r#"
listen = "127.0.0.1:9000"

[[tenants]]
id = "acme"

[[tenants.api_keys]]
name = "sdk"
sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
scopes = ["ingest", "read"]

[[tenants.rate_plans]]
version = 1
[tenants.rate_plans.tools."*"]
price = { per_call = 5000, per_input_token = 1 }
cost = { per_call = 200, per_input_token = 0.5, per_second = "100" }
"#;

    #[test]
    fn a_full_config_parses_and_validates() {
        let c = Config::from_toml(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.tenants[0].api_keys[0].scopes,
            vec![Scope::Ingest, Scope::Read]
        );
        let star = &c.tenants[0].rate_plans[0].tools["*"];
        assert_eq!(star.cost.per_input_token.scaled(), 500_000);
        assert_eq!(c.ingest.max_batch_events, 1000);
        // The path with the environment on top reads the same file the same way.
        let through_env = Config::from_toml_and_env(GOOD, |_| None).unwrap();
        assert_eq!(format!("{through_env:?}"), format!("{c:?}"));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::from_toml("lissten = \"x\"").unwrap_err();
        assert!(err.contains("unknown field `lissten`"), "{err}");
        let err =
            Config::from_toml(&GOOD.replace("per_call = 5000", "per_cal = 5000")).unwrap_err();
        assert!(err.contains("unknown field `per_cal`"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let bad = GOOD
            .replace("127.0.0.1:9000", "nowhere")
            .replace("2c26b46b", "XYZ")
            .replace("[\"ingest\", \"read\"]", "[]")
            .replace("tools.\"*\"", "tools.\"web\"");
        let err = Config::from_toml(&bad).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        assert!(text.contains("listen `nowhere` has no port"), "{text}");
        assert!(text.contains("sha256 must be 64 lower-case hex"));
        assert!(text.contains("scopes is empty"));
        assert!(text.contains("no `\"*\"` tool rate"));
    }

    #[test]
    fn plan_versions_must_be_unique_and_start_in_order() {
        let two = format!(
            "{GOOD}\n[[tenants.rate_plans]]\nversion = 1\neffective_from = \"2026-01-01T00:00:00Z\"\n[tenants.rate_plans.tools.\"*\"]\n"
        );
        let err = Config::from_toml(&two).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("version is used twice"), "{err}");
    }

    #[test]
    fn limits_need_a_maximum_within_range() {
        let text = GOOD.to_string()
            + "\n[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\n\n[[tenants.limits]]\nper = \"agent\"\nwindow = \"hour\"\nmax_calls = 0\n";
        let err = Config::from_toml(&text).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].ends_with("set max_calls, max_spend_micros or both"));
        assert!(err.problems[1].contains("max_calls must be 1 to"));
    }

    #[test]
    fn margin_thresholds_are_whole_basis_points_in_order() {
        let t = Config::from_toml(GOOD).unwrap().tenants[0]
            .margin_guard
            .thresholds()
            .unwrap();
        assert_eq!(t, MarginThresholds::default());
        let custom = GOOD.to_string()
            + "\n[tenants.margin_guard]\nwarn_below = 0.35\nthrottle_below = 0.125\nblock_below = -0.05\n";
        let t = Config::from_toml(&custom).unwrap().tenants[0]
            .margin_guard
            .thresholds()
            .unwrap();
        assert_eq!(
            (t.warn_below_bp, t.throttle_below_bp, t.block_below_bp),
            (3500, 1250, -500)
        );
        let bad = GOOD.to_string()
            + "\n[tenants.margin_guard]\nwarn_below = 0.05\nthrottle_below = 0.10001\n";
        let err = Config::from_toml(&bad).unwrap().validate().unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert!(
            err.problems[0].contains("throttle_below must be a fraction"),
            "{err}"
        );
        let unordered = GOOD.to_string() + "\n[tenants.margin_guard]\nwarn_below = 0.05\n";
        let err = Config::from_toml(&unordered)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            err.problems[0].contains("block_below <= throttle_below <= warn_below"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_apply_and_bad_values_are_named() {
        let c = Config::from_toml_and_env("", |v| {
            (v == "MCP_METER_INGEST_MAX_BATCH_EVENTS").then(|| "10".to_string())
        })
        .unwrap();
        assert_eq!(c.ingest.max_batch_events, 10);
        let err = Config::from_toml_and_env("", |v| {
            v.starts_with("MCP_METER_SQLITE")
                .then(|| "lots".to_string())
        })
        .unwrap_err();
        assert_eq!(err.problems.len(), 3);
        assert!(err.problems[0].starts_with(
            "MCP_METER_SQLITE_MAX_COMMIT_EVENTS (overrides sqlite.max_commit_events)"
        ));
    }

    #[test]
    fn retention_keeps_keys_as_long_as_ingest_accepts_retries() {
        let ok = Config::from_toml("[retention]\ndedup_days = 35\nraw_days = 400").unwrap();
        assert!(ok.validate().is_ok());
        assert_eq!(Config::default().retention.dedup_days, 40);
        assert_eq!(Config::default().retention.raw_days, None);
        let bad = Config::from_toml("[retention]\ndedup_days = 30\nraw_days = 20").unwrap();
        let err = bad.validate().unwrap_err();
        assert!(
            err.problems[0].starts_with(
                "retention.dedup_days (30) must be at least ingest.max_event_age_days (35)"
            ),
            "{err}"
        );
        assert!(
            err.problems[1]
                .starts_with("retention.raw_days (20) must be at least retention.dedup_days (30)"),
            "{err}"
        );
        let raw_days = |value: &'static str| {
            Config::from_toml_and_env("[retention]\nraw_days = 400", move |v| {
                (v == "MCP_METER_RETENTION_RAW_DAYS").then(|| value.to_string())
            })
            .unwrap()
            .retention
            .raw_days
        };
        assert_eq!(raw_days("90"), Some(90));
        assert_eq!(
            raw_days(""),
            None,
            "an empty value unsets an optional setting"
        );
    }
}
