//! Everything ingest does to untrusted bytes before they are stored: split a body into events
//! (as `/v1/ingest/events` does), parse each, validate it, rate it. Nothing may panic; what
//! passes must be priced within bounds, with lengths inside the wire contract.

#![no_main]

use libfuzzer_sys::fuzz_target;
use schemas::event::{parse_event, validate, EventLimits, TimeBounds};
use schemas::rating::{demo_rate_plan, RatePlans};
use serde_json::value::RawValue;

const NOW_MS: i64 = 1_795_181_530_000; // 2026-11-20T13:32:10Z

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let events: Vec<&RawValue> = match body.trim_start().as_bytes().first() {
        Some(b'[') => match serde_json::from_str(body) {
            Ok(events) => events,
            Err(_) => return,
        },
        _ => match serde_json::from_str(body) {
            Ok(one) => vec![one],
            Err(_) => return,
        },
    };
    let plans = RatePlans::new(vec![demo_rate_plan()]);
    let bounds = TimeBounds {
        received_at_ms: NOW_MS,
        max_age_ms: 35 * 86_400_000,
        max_future_skew_ms: 300_000,
    };
    let limits = EventLimits {
        max_metadata_bytes: 16 * 1024,
    };
    for raw in events {
        let raw = raw.get();
        let Ok(wire) = parse_event(raw) else { continue };
        let Ok(valid) = validate(wire, raw, bounds, limits) else {
            continue;
        };
        let rated = plans.rate(valid, NOW_MS).expect("a validated event always rates");
        assert!(rated.revenue_micros >= 0 && rated.cogs_micros >= 0, "{rated:?}");
        assert!(rated.tool_name.encode_utf16().count() <= 64);
        assert!(rated.session_id.encode_utf16().count() <= 64);
        assert!(!rated.idempotency_key.is_empty());
        assert!((NOW_MS - 35 * 86_400_000..=NOW_MS + 300_000).contains(&rated.occurred_at_ms));
    }
});
