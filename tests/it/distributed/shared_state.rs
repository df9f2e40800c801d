//! Two ingestors sharing hard-limit counters and rate limits through Redis.

use super::*;

/// Hard limits across ingestors: two ingestor processes share the counters in Redis, so the
/// limit holds for the session whichever ingestor each call goes through.
#[test]
fn two_ingestors_share_hard_limit_counters_through_redis() {
    let redis = shared_redis();
    let prefix = unique_database("limits");
    let setup = Setup::new(
        "limits",
        &kafka_brokers(),
        2,
        &format!(
            "[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n\n\
[[tenants.limits]]\nper = \"session\"\nwindow = \"day\"\nmax_calls = 4\n"
        ),
    );
    assert_eq!(
        setup.config.tenants[2].limits.len(),
        1,
        "the limit belongs to initech"
    );
    let (_a, client_a) = setup.ingestor();
    let (_b, client_b) = setup.ingestor();
    // The first call loads the tenant's ledger, which waits until the store holds what Kafka
    // acknowledged: the distributed mode runs with an aggregator.
    let _aggregator = setup.aggregator();
    let mut answers = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &client_a } else { &client_b };
        let (status, answer) = client.post(
            "/v1/ingest/events",
            INITECH,
            &call(&format!("l{n}"), "t", "a", "shared").to_string(),
        );
        assert_eq!(status, 202, "{answer}");
        answers.push(answer["killedSessionIds"].clone());
    }
    let none = serde_json::json!([]);
    let killed = serde_json::json!(["shared"]);
    assert_eq!(
        answers,
        vec![
            none.clone(),
            none.clone(),
            none.clone(),
            none,
            killed.clone(),
            killed
        ]
    );
}

/// A key's rate limit holds across ingestors: its bucket lives in Redis, so a burst of 4 is 4
/// requests whichever ingestor each goes to.
#[test]
fn two_ingestors_share_a_keys_rate_limit_through_redis() {
    let redis = shared_redis();
    let prefix = unique_database("rate");
    let setup = Setup::new(
        "rate",
        &kafka_brokers(),
        1,
        &format!("[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n"),
    );
    // initech's key: 4 at once, then one every 10 s.
    let text = std::fs::read_to_string(&setup.file).unwrap();
    let limited = text.replacen(
        "scopes = [\"admin\"] }]",
        "scopes = [\"admin\"], rate_limit = { requests_per_second = 0.1, burst = 4 } }]",
        1,
    );
    assert_ne!(text, limited);
    std::fs::write(&setup.file, limited).unwrap();
    let (_a, client_a) = setup.ingestor();
    let (_b, client_b) = setup.ingestor();
    let mut statuses = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &client_a } else { &client_b };
        let (status, answer) = client.post(
            "/v1/ingest/events",
            INITECH,
            &call(&format!("q{n}"), "t", "a", "s").to_string(),
        );
        if status == 429 {
            assert_eq!(answer["error"], "rate_limited", "{answer}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [202, 202, 202, 202, 429, 429]);
    // Other keys are not limited.
    assert_eq!(client_b.post("/v1/ingest/events", ACME, SEED).0, 202);
}

/// The tool-name bound across ingestors: the known names live in Redis, so two ingestor
/// processes admit `max_tool_names` names between them, not each.
#[test]
fn two_ingestors_share_the_tool_name_bound_through_redis() {
    let redis = shared_redis();
    let prefix = unique_database("toolnames");
    let setup = Setup::with_tenant(
        &clickhouse_url(),
        "",
        "toolnames",
        &kafka_brokers(),
        2,
        "max_tool_names = 3",
        &format!("[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n"),
    );
    assert_eq!(setup.config.tenants[2].max_tool_names, 3);
    let (_procs, [a, b]) = setup.two_ingestors();
    let mut accepted = Vec::new();
    for (n, tool) in ["t1", "t2", "t3", "t4", "t1", "t5", "t3"]
        .iter()
        .enumerate()
    {
        let client = if n % 2 == 0 { &a } else { &b };
        let (status, answer) = client.post(
            "/v1/ingest/events",
            INITECH,
            &call(&format!("tn{n}"), tool, "a", "s").to_string(),
        );
        assert_eq!(status, 202, "{answer}");
        accepted.push(answer["accepted"].as_u64().unwrap());
    }
    assert_eq!(accepted, [1, 1, 1, 0, 1, 0, 1]);
}
