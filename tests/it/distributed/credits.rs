//! Charge before the tool runs with the state in Redis, shared by two ingestor processes; and
//! balances rebuilt exactly from ClickHouse (grants, raw usage) after Redis lost everything.

use super::*;
use crate::credits::{
    authorize_body, balance, exactly_37_of_200_pass, grant, one_nonce_asked_50_times_reserves_once,
    scenario_batch, scenario_call_after, settling_call, QUOTE, SCENARIO_BATCH_MICROS,
    SCENARIO_STORED_MICROS,
};

/// A setup whose ingestors share `redis` under a key prefix of the test's own.
fn setup_on(name: &str, redis: &str) -> Setup {
    let prefix = unique_database(name);
    Setup::new(
        name,
        &kafka_brokers(),
        2,
        &format!("[redis]\nurl = \"{redis}\"\nkey_prefix = \"{prefix}:\"\n"),
    )
}

/// The concurrency counts hold across processes: one Lua script per decision.
#[test]
fn two_ingestors_sharing_redis_authorize_exactly_what_the_balance_covers() {
    let setup = setup_on("credits", &shared_redis());
    let (_procs, [a, b]) = setup.two_ingestors();
    exactly_37_of_200_pass(&[&a, &b], INITECH, "cust-37");
    one_nonce_asked_50_times_reserves_once(&[&a, &b], INITECH);
    // A reservation made through one ingestor is settled by an event through the other.
    let (status, _) = a.post(
        "/v1/authorize",
        INITECH,
        &authorize_body("cross", "cust-nonce"),
    );
    assert_eq!(status, 200);
    let (status, _) = b.post(
        "/v1/ingest/events",
        INITECH,
        &settling_call("cross", "cust-nonce", 100).to_string(),
    );
    assert_eq!(status, 202);
    let after = balance(&a, INITECH, "cust-nonce");
    assert_eq!(after["settledMicros"], QUOTE + 300);
    assert_eq!(
        after["reservedMicros"], QUOTE,
        "the one of same-nonce is still open"
    );
}

/// Redis killed and started empty: the next request rebuilds every wallet of the tenant from
/// the grants and the raw usage in ClickHouse, to the µUSD; open reservations are gone (they
/// only held money back).
#[test]
fn balances_are_rebuilt_exactly_after_redis_loses_its_data() {
    let mut redis = RedisServer::start();
    let setup = setup_on("rebuild", &redis.url());
    let (_ingestor, client) = setup.ingestor();
    let _aggregator = setup.aggregator();
    let customers = ["cust-a", "cust-b"];
    for (n, c) in customers.iter().enumerate() {
        assert_eq!(grant(&client, INITECH, c, 40_000, &format!("g-{c}")).0, 201);
        assert_eq!(grant(&client, INITECH, c, 7_000, &format!("g2-{c}")).0, 201);
        for i in 0..(3 + n) {
            let nonce = format!("{c}-{i}");
            let (status, answer) =
                client.post("/v1/authorize", INITECH, &authorize_body(&nonce, c));
            assert_eq!(status, 200, "{answer}");
            let event = settling_call(&nonce, c, 10 * i as i64);
            assert_eq!(
                client
                    .post("/v1/ingest/events", INITECH, &event.to_string())
                    .0,
                202
            );
        }
        // One left open: the rebuild drops it.
        assert_eq!(
            client
                .post(
                    "/v1/authorize",
                    INITECH,
                    &authorize_body(&format!("{c}-open"), c)
                )
                .0,
            200
        );
    }
    let before: Vec<Value> = customers
        .iter()
        .map(|c| balance(&client, INITECH, c))
        .collect();
    // Every event stored before Redis goes: the rebuild reads what the store holds.
    let stored = || {
        setup
            .sql("SELECT count() FROM mcp_events WHERE tenant_id = 'initech'")
            .trim()
            == "7"
    };
    assert!(
        wait_until(Duration::from_secs(30), stored),
        "the aggregator stored the events"
    );

    redis.stop();
    redis.start_again();
    // The first request after the restart may find the old connection broken (503, retry).
    let back = || client.get("/v1/customers/cust-a/balance", INITECH).0 == 200;
    assert!(wait_until(Duration::from_secs(10), back), "Redis is back");
    for (c, before) in customers.iter().zip(&before) {
        let after = balance(&client, INITECH, c);
        assert_eq!(after["grantedMicros"], before["grantedMicros"], "{c}");
        assert_eq!(after["settledMicros"], before["settledMicros"], "{c}");
        assert_eq!(
            after["reservedMicros"], 0,
            "{c}: open reservations are lost"
        );
        assert_eq!(
            after["availableMicros"].as_i64().unwrap(),
            before["availableMicros"].as_i64().unwrap() + QUOTE,
            "{c}"
        );
        // And settled is the independent sum of the stored revenue.
        let sum = setup.sql(&format!(
            "SELECT sum(revenue_micros) FROM mcp_events WHERE tenant_id = 'initech' AND customer_id = '{c}'"
        ));
        assert_eq!(
            after["settledMicros"].as_i64().unwrap().to_string(),
            sum.trim(),
            "{c}"
        );
    }
    // The rebuilt wallets go on as before: authorizations and settlements.
    let (status, _) = client.post("/v1/authorize", INITECH, &authorize_body("after", "cust-a"));
    assert_eq!(status, 200);
    assert_eq!(balance(&client, INITECH, "cust-a")["reservedMicros"], QUOTE);
}

/// The restart scenario's twin: Redis killed and started empty between two batches of a
/// prepaid customer, the next batch (through the other ingestor) triggering the rebuild. The
/// rebuild counts the stored calls, the batch is settled once, and the balance equals the
/// revenue ClickHouse holds for the customer.
#[test]
fn the_first_batch_after_redis_lost_its_data_is_charged_once() {
    let mut redis = RedisServer::start();
    let setup = setup_on("rebuild_once", &redis.url());
    let (_procs, [a, b]) = setup.two_ingestors();
    let _aggregator = setup.aggregator();
    let c = "cust-r";
    assert_eq!(grant(&a, INITECH, c, 1_000_000, "g1").0, 201);
    let first = scenario_batch(c);
    assert_eq!(a.post("/v1/ingest/batch", INITECH, &first).0, 202);
    assert_eq!(
        balance(&a, INITECH, c)["settledMicros"],
        SCENARIO_BATCH_MICROS
    );
    redis.stop();
    redis.start_again();
    // No wait for the aggregator: the rebuild itself waits until ClickHouse holds r1 and r2.
    let third = scenario_call_after(c);
    let (status, answer) = b.post("/v1/ingest/events", INITECH, &third);
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = b.post("/v1/ingest/batch", INITECH, &first);
    assert_eq!(status, 202, "{answer}");
    let stored_revenue = SCENARIO_STORED_MICROS;
    let back = || a.get(&format!("/v1/customers/{c}/balance"), INITECH).0 == 200;
    assert!(wait_until(Duration::from_secs(10), back), "Redis is back");
    for client in [&a, &b] {
        let live = balance(client, INITECH, c);
        assert_eq!(live["settledMicros"], stored_revenue, "{live}");
    }
    let stored = || {
        setup
            .sql("SELECT sum(revenue_micros) FROM mcp_events WHERE customer_id = 'cust-r'")
            .trim()
            == stored_revenue.to_string()
    };
    assert!(
        wait_until(Duration::from_secs(30), stored),
        "ClickHouse holds the three calls once"
    );
}
