//! The documentation's examples are real: the README's config parses and validates, and the
//! demo plan prices the seed event as the README says.

use crate::common::distributed::{serve_base, spawn_with_url};
use schemas::config::{Config, Scope};
use std::process::Command;

fn readme() -> String {
    repo_file("README.md")
}

/// Every fenced block of `language` (`toml`, `sh`) in `text`.
fn blocks<'a>(text: &'a str, language: &str) -> Vec<&'a str> {
    text.split(&format!("```{language}\n"))
        .skip(1)
        .map(|rest| &rest[..rest.find("```").unwrap()])
        .collect()
}

#[test]
fn the_readme_config_examples_are_valid() {
    let text = readme();
    let blocks = blocks(&text, "toml");
    let full = *blocks
        .iter()
        .find(|b| b.contains("listen = "))
        .expect("a full config example");
    let config = Config::from_toml(full).unwrap();
    config.validate().unwrap();
    // The reference block shows the defaults: what it sets is what an empty file gets, and
    // what is unset by default (kafka.brokers, redis.url) is commented out.
    let default = Config::default();
    let sections = |c: &Config| {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            c.listen,
            c.data_dir,
            c.store,
            c.clickhouse,
            c.kafka,
            c.redis,
            c.margin_guard,
            c.retention,
            c.aggregator,
            c.ingest,
            c.sqlite,
            c.credits,
            c.portal,
            c.http,
            c.rate_limits
        )
    };
    assert_eq!(sections(&config), sections(&default));
    assert!(config.kafka.brokers.is_none() && config.redis.url.is_none());
    assert!(config.portal.secret.is_none() && config.http.metrics_listen.is_none());
    let web = &config.tenants[0].rate_plans[0].tools["web_search"];
    assert_eq!(web.cost.per_second.scaled(), 250_000);
    // Each snippet is valid where it belongs: after the full example.
    for snippet in blocks.iter().filter(|b| !b.contains("listen = ")) {
        let combined = format!("{full}\n{snippet}");
        let config = Config::from_toml(&combined).unwrap_or_else(|e| panic!("{snippet}: {e}"));
        config
            .validate()
            .unwrap_or_else(|e| panic!("{snippet}: {e}"));
    }
    assert!(blocks.len() >= 2);
}

#[test]
fn the_readme_starts_with_the_two_commands() {
    let text = readme();
    let first_block = &text[text.find("```sh").unwrap()..];
    let first_block = &first_block[..first_block[3..].find("```").unwrap()];
    assert!(first_block.contains("cargo run --release -- serve"));
    assert!(first_block.contains("scripts/test"));
}

/// The benchmark config that docs/BENCHMARKS.md and scripts/bench-ingest use is one `serve`
/// accepts, with the key the script passes.
#[test]
fn the_benchmark_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/serve.toml");
    let config = mcp_meter::load_config(
        Some(std::path::Path::new(path)),
        |_| None,
        &mcp_meter::Overrides::default(),
    )
    .unwrap();
    assert_eq!(
        config.tenants[0].api_keys[0].sha256,
        mcp_meter::sha256_hex("bench-key")
    );
    let script =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-ingest"))
            .unwrap();
    assert!(script.contains("--key bench-key") && script.contains("bench/serve.toml"));
}

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_readme_links_only_files_of_the_repository() {
    let text = readme();
    assert!(
        !text.contains("../"),
        "the README points outside the repository"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let links: Vec<&str> = text
        .split("](")
        .skip(1)
        .map(|rest| &rest[..rest.find(')').unwrap()])
        .filter(|l| !l.starts_with("http") && !l.starts_with('#'))
        .collect();
    assert!(!links.is_empty());
    for link in links {
        assert!(
            root.join(link).exists(),
            "README links {link}, which is not in the repository"
        );
    }
}

/// A reader pastes the README's commands after the walk-through: they use its key (or the
/// compose stack's), never a variable nothing set, and the export asks for the current month.
#[test]
fn the_readme_commands_use_the_walk_through_key_and_the_current_month() {
    let text = readme();
    for block in blocks(&text, "sh") {
        assert!(
            !block.contains("$KEY"),
            "a command uses $KEY, which nothing sets:\n{block}"
        );
        for line in block.lines().filter(|l| l.contains("period=")) {
            assert!(
                line.contains("period=$(date -u +%Y-%m)"),
                "a fixed month: {line}"
            );
        }
        for line in block
            .lines()
            .filter(|l| l.contains("X-API-Key:") || l.contains("Bearer "))
        {
            assert!(
                line.contains("demo-key") || line.contains("mcpm_compose_demo_key_change_me"),
                "a key the reader does not have: {line}"
            );
        }
    }
}

/// The production-shaped example: three tenants, a key per job whose example value (in the
/// comment beside it) matches its hash, plans with several tools, limits, margin thresholds.
#[test]
fn the_production_example_config_loads_with_three_tenants_keys_plans_and_limits() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/production.toml");
    let config =
        mcp_meter::load_config(Some(&path), |_| None, &mcp_meter::Overrides::default()).unwrap();
    assert_eq!(config.tenants.len(), 3);
    for tenant in &config.tenants {
        let can = |scope: Scope| {
            tenant
                .api_keys
                .iter()
                .any(|k| k.scopes.contains(&scope) || k.scopes.contains(&Scope::Admin))
        };
        assert!(
            can(Scope::Ingest) && can(Scope::Read) && can(Scope::Export),
            "{}",
            tenant.id
        );
        assert!(tenant.api_keys.len() >= 2, "{}: a key per job", tenant.id);
        for plan in &tenant.rate_plans {
            assert!(
                plan.tools.contains_key("*") && plan.tools.len() >= 3,
                "{}",
                tenant.id
            );
        }
        assert!(!tenant.limits.is_empty(), "{}", tenant.id);
    }
    assert!(
        config.tenants.iter().any(|t| t.rate_plans.len() >= 2),
        "a plan change"
    );
    assert!(
        config
            .tenants
            .iter()
            .any(|t| t.margin_guard.warn_below != 0.2),
        "thresholds of a tenant's own"
    );
    // Each example key is the one its hash stands for.
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut checked = 0;
    for (i, line) in lines.iter().enumerate() {
        if let Some((_, key)) = line.split_once("# key: ") {
            let hash = lines[i + 1]
                .trim_start_matches("sha256 = ")
                .trim_matches('"');
            assert_eq!(mcp_meter::sha256_hex(key.trim()), hash, "{line}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        config
            .tenants
            .iter()
            .map(|t| t.api_keys.len())
            .sum::<usize>()
    );
}

/// The Dockerfile's `docker run` example, run as the image would run it (its ENTRYPOINT is the
/// binary, the mounted directory is the repository's examples/config): `serve` accepts it,
/// listens beyond loopback, and the example keys ingest and read.
#[test]
fn the_dockerfile_run_example_serves_the_example_config() {
    let dockerfile = repo_file("Dockerfile");
    let example: String = dockerfile
        .lines()
        .skip_while(|l| !l.contains("docker run"))
        .take_while(|l| !l.starts_with("#     ("))
        .map(|l| l.trim_start_matches('#').trim().trim_end_matches('\\'))
        .collect::<Vec<_>>()
        .join(" ");
    let args: Vec<String> = example
        .split_whitespace()
        .skip_while(|w| *w != "mcp-meter")
        .skip(1)
        .map(|w| {
            w.replace(
                "/etc/mcp-meter/",
                concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config/"),
            )
            // Port 0: the test takes whatever port is free, on every address as in the example.
            .replace("0.0.0.0:8080", "0.0.0.0:0")
        })
        .collect();
    assert_eq!(args[0], "serve", "{example}");
    assert!(args.contains(&"0.0.0.0:0".to_string()), "{example}");
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command.args(&args).env("MCP_METER_DATA_DIR", data.path());
    // A refused example prints no URL: the test fails here, with serve's error on stderr.
    let (mut child, base) = spawn_with_url(command, serve_base);
    let port = base.rsplit(':').next().unwrap();
    let local = format!("http://127.0.0.1:{port}");
    let event = r#"{"metricName":"mcp_server.tool_invocations","toolName":"web_search","agentId":"a","sessionId":"s"}"#;
    let answer = ureq::post(format!("{local}/v1/ingest/events"))
        .header("X-API-Key", "acme-ingest-example")
        .header("Content-Type", "application/json")
        .send(event)
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let summary = ureq::get(format!("{local}/analytics/mcp/summary"))
        .header("X-API-Key", "acme-read-example")
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.contains("\"accepted\":1"), "{answer}");
    assert!(summary.contains("\"calls\":1"), "{summary}");
}

/// The README's full config block, as a file.
fn readme_config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let text = readme();
    let full = *blocks(&text, "toml")
        .iter()
        .find(|b| b.contains("listen = "))
        .expect("a full config example");
    let file = dir.join("mcp-meter.toml");
    std::fs::write(&file, full).unwrap();
    file
}

/// The README's config example can be used as it is: its key is shown beside its hash, and
/// `serve --config` with it answers the walk-through's ingest, analytics read and export with
/// that key, rated by the example's own plan (`web_search` alone, no `"*"` token rates). Its
/// ingest-only key ingests and reads nothing.
#[test]
fn the_readme_config_example_serves_the_walk_through_with_the_key_it_shows() {
    use crate::common::{Client, SEED};
    let text = readme();
    for (key, scope) in [("demo-key", Scope::Admin), ("demo-sdk-key", Scope::Ingest)] {
        let hash = mcp_meter::sha256_hex(key);
        let line = text
            .lines()
            .find(|l| l.contains(&hash))
            .unwrap_or_else(|| panic!("no hash of `{key}` in the README"));
        assert!(line.contains(&format!("`{key}`")), "{line}");
        let dir = tempfile::tempdir().unwrap();
        let config = mcp_meter::load_config(
            Some(&readme_config_file(dir.path())),
            |_| None,
            &mcp_meter::Overrides::default(),
        )
        .unwrap();
        let found = config.tenants[0]
            .api_keys
            .iter()
            .find(|k| k.sha256 == hash)
            .unwrap();
        assert_eq!(found.scopes, [scope], "{key}");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(readme_config_file(dir.path()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("MCP_METER_CONFIG")
        .env_remove("MCP_METER_LISTEN")
        .env_remove("MCP_METER_STORE");
    let (mut child, base) = spawn_with_url(command, serve_base);
    let client = Client::new(&base);
    let (status, ingested) = client.post("/v1/ingest/events", "demo-key", SEED);
    let (read_status, tools) = client.get("/analytics/mcp/revenue/by-tool", "demo-key");
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let (export_status, csv) =
        client.get_text(&format!("/v1/exports/billing?period={month}"), "demo-key");
    let (sdk_status, sdk_answer) = client.post("/v1/ingest/events", "demo-sdk-key", SEED);
    let (sdk_read, _) = client.get("/analytics/mcp/summary", "demo-sdk-key");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        (status, &ingested["accepted"]),
        (202, &1.into()),
        "{ingested}"
    );
    assert_eq!(read_status, 200, "{tools}");
    assert_eq!(tools["tools"][0]["toolName"], "web_search", "{tools}");
    assert_eq!(tools["tools"][0]["revenueMicros"], 8000, "{tools}");
    assert_eq!(tools["tools"][0]["cogsMicros"], 2500, "{tools}");
    assert_eq!(export_status, 200, "{csv}");
    assert!(
        csv.contains(&format!(
            "{month},usage,,agent_gpt4o_prod,web_search,1,0,1200,450,542,8000,"
        )),
        "{csv}"
    );
    // The ingest-only key ingests, and reads nothing.
    assert_eq!(
        (sdk_status, &sdk_answer["accepted"]),
        (202, &1.into()),
        "{sdk_answer}"
    );
    assert_eq!(sdk_read, 403);
}

/// The README's fuzz command names the target `fuzz/` builds, folders that are in `fuzz/`
/// or that the block makes first: libFuzzer refuses a corpus folder that does not exist.
#[test]
fn the_readme_fuzz_command_names_folders_that_exist_or_that_it_makes() {
    let text = readme();
    let block = *blocks(&text, "sh")
        .iter()
        .find(|b| b.contains("cargo fuzz run"))
        .expect("a fuzz command");
    assert!(block.starts_with("cd fuzz\n"), "{block}");
    let fuzz = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let made: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split('#').next()?.trim().strip_prefix("mkdir -p "))
        .flat_map(|dirs| dirs.split_whitespace())
        .collect();
    let run = block
        .lines()
        .find_map(|l| l.split_once("cargo fuzz run ").map(|(_, r)| r))
        .unwrap();
    let args: Vec<&str> = run
        .split(" -- ")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let manifest = repo_file("fuzz/Cargo.toml");
    assert!(
        manifest.contains(&format!("name = \"{}\"", args[0])),
        "fuzz/Cargo.toml has no target `{}`",
        args[0]
    );
    assert!(args.len() >= 2, "{run}");
    for folder in &args[1..] {
        assert!(
            fuzz.join(folder).is_dir() || made.contains(folder),
            "`{folder}` is neither in fuzz/ nor made by the block:\n{block}"
        );
    }
    // The folder the fuzzer starts from is checked in, with inputs.
    let seeds = std::fs::read_dir(fuzz.join(args[args.len() - 1])).unwrap();
    assert!(seeds.count() > 0);
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// examples/config/distributed.toml runs the distributed mode as it is: `migrate`, an
/// `aggregator` and an `ingestor` started with it (the services' addresses, and names of the
/// test's own, from `MCP_METER_*` as a deployment would set them) take an event with its
/// ingest key and answer it back through analytics with its admin key.
#[test]
fn the_distributed_example_config_ingests_through_kafka_and_reads_back() {
    use crate::common::distributed::{kafka_brokers, wait_until};
    use crate::common::{clickhouse_url, unique_database, Client, SEED};
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config/distributed.toml");
    let config = Config::from_toml(&repo_file("examples/config/distributed.toml")).unwrap();
    config.validate().unwrap();
    assert!(config.kafka.brokers.is_some() && config.redis.url.is_some());
    let name = unique_database("example");
    let redis = std::env::var("MCP_METER_TEST_REDIS_URL")
        .expect("MCP_METER_TEST_REDIS_URL is not set: run scripts/test, which starts Redis");
    let env = [
        ("MCP_METER_KAFKA_BROKERS", kafka_brokers()),
        ("MCP_METER_KAFKA_EVENTS_TOPIC", format!("{name}.events")),
        (
            "MCP_METER_KAFKA_DEAD_LETTER_TOPIC",
            format!("{name}.dead-letter"),
        ),
        ("MCP_METER_KAFKA_CONSUMER_GROUP", name.clone()),
        ("MCP_METER_KAFKA_PARTITIONS", "2".into()),
        ("MCP_METER_CLICKHOUSE_URL", clickhouse_url()),
        ("MCP_METER_CLICKHOUSE_DATABASE", name.clone()),
        ("MCP_METER_CLICKHOUSE_USER", "default".into()),
        ("MCP_METER_CLICKHOUSE_PASSWORD", String::new()),
        ("MCP_METER_REDIS_URL", redis),
        ("MCP_METER_REDIS_KEY_PREFIX", format!("{name}:")),
        ("MCP_METER_AGGREGATOR_LISTEN", "127.0.0.1:0".into()),
        ("MCP_METER_LISTEN", "127.0.0.1:0".into()),
    ];
    let command = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
        command.args(args).arg("--config").arg(&file);
        command.env_remove("MCP_METER_CONFIG").envs(env.clone());
        command
    };
    let migrated = command(&["migrate"]).output().unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let _aggregator = Killed(
        command(&["aggregator"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (ingestor, base) = spawn_with_url(command(&["ingestor"]), |l| {
        let rest = l.strip_prefix("mcp-meter ingestor: ")?;
        Some(rest.split(' ').next()?.to_string())
    });
    let _ingestor = Killed(ingestor);
    let client = Client::new(&base);
    let (status, answer) = client.post("/v1/ingest/events", "dist-ingest-example", SEED);
    assert_eq!((status, &answer["accepted"]), (202, &1.into()), "{answer}");
    let calls = || {
        client.get("/analytics/mcp/summary", "dist-admin-example").1["calls"]
            .as_i64()
            .unwrap_or(0)
    };
    assert!(
        wait_until(std::time::Duration::from_secs(30), || calls() == 1),
        "the event never reached analytics"
    );
    let (status, tools) = client.get("/analytics/mcp/revenue/by-tool", "dist-admin-example");
    assert_eq!(status, 200, "{tools}");
    assert_eq!(tools["tools"][0]["revenueMicros"], 7550, "{tools}");
    // The ingest key reads no figures.
    let (status, _) = client.get("/analytics/mcp/summary", "dist-ingest-example");
    assert_eq!(status, 403);
}
