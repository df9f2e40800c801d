//! docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here): the
//! compose file parses, its services, healthchecks and start order hold together, and every
//! process's environment and mounted config are what `mcp-meter` accepts, pointing at the
//! services and ports the compose file defines.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn compose() -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docker-compose.yml")).unwrap();
    let mut value: Value = serde_yaml::from_str(&text).unwrap();
    value.apply_merge().unwrap();
    // Merge keys nested in services (`environment: {<<: *env}`) need their own pass.
    for (_, service) in value["services"].as_mapping_mut().unwrap().iter_mut() {
        service.apply_merge().unwrap();
    }
    value
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap().trim().to_string(),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `host:port` out of a URL or an address.
fn host_port(address: &str) -> (String, u16) {
    let rest = address.split("://").last().unwrap();
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').unwrap();
    (host.to_string(), port.parse().unwrap())
}

const APPS: [&str; 3] = ["migrate", "ingestor", "aggregator"];

#[test]
fn the_stack_has_every_service_with_healthchecks_and_a_start_order() {
    let c = compose();
    let services = c["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "aggregator",
            "clickhouse",
            "ingestor",
            "kafka",
            "migrate",
            "redis"
        ])
    );
    for name in ["kafka", "clickhouse", "redis", "ingestor", "aggregator"] {
        assert!(
            c["services"][name]["healthcheck"]["test"].is_sequence(),
            "{name} has no healthcheck"
        );
    }
    // KRaft: the broker is its own controller, no ZooKeeper anywhere.
    let kafka = environment(&c["services"]["kafka"]);
    assert_eq!(kafka["KAFKA_PROCESS_ROLES"], "broker,controller");
    assert!(!names.iter().any(|n| n.contains("zookeeper")));
    // migrate runs once, after the broker and ClickHouse are healthy; the processes after it.
    assert_eq!(c["services"]["migrate"]["restart"].as_str(), Some("no"));
    for dep in ["kafka", "clickhouse"] {
        assert_eq!(
            c["services"]["migrate"]["depends_on"][dep]["condition"].as_str(),
            Some("service_healthy")
        );
    }
    for app in ["ingestor", "aggregator"] {
        assert_eq!(
            c["services"][app]["depends_on"]["migrate"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{app}"
        );
    }
    for app in APPS {
        let service = &c["services"][app];
        assert_eq!(
            service["build"].as_str(),
            Some("."),
            "{app} builds the Dockerfile"
        );
        let command = service["command"][0].as_str().unwrap();
        assert_eq!(command, app, "{app} runs `mcp-meter {app}`");
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(
            help.status.success(),
            "`mcp-meter {command}` is a real subcommand"
        );
    }
}

#[test]
fn every_process_gets_a_config_mcp_meter_accepts_pointing_at_the_compose_services() {
    let c = compose();
    let known: BTreeSet<&str> = schemas::config::env_overrides()
        .iter()
        .map(|o| o.var.as_str())
        .chain([
            "MCP_METER_CONFIG",
            "MCP_METER_LISTEN",
            "MCP_METER_LOG",
            "MCP_METER_LOG_FORMAT",
        ])
        .collect();
    let services: BTreeSet<String> = c["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    for app in APPS {
        let service = &c["services"][app];
        let env = environment(service);
        for var in env.keys().filter(|v| v.starts_with("MCP_METER_")) {
            assert!(
                known.contains(var.as_str()),
                "{app}: {var} is read by nothing"
            );
        }
        // The mounted file is the one the environment names.
        let target = &env["MCP_METER_CONFIG"];
        let mount = service["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find_map(|v| {
                let mut parts = v.split(':');
                let (source, dest) = (parts.next()?, parts.next()?);
                (dest == target).then(|| source.to_string())
            })
            .unwrap_or_else(|| panic!("{app}: nothing mounted at {target}"));
        let file = Path::new(ROOT).join(mount);
        let overrides = mcp_meter::Overrides {
            listen: env.get("MCP_METER_LISTEN").cloned(),
            data_dir: None,
        };
        let config = mcp_meter::load_config(Some(&file), |v| env.get(v).cloned(), &overrides)
            .unwrap_or_else(|e| panic!("{app}: {e:#}"));

        // Every address resolves to a compose service, on the port that service listens on.
        let brokers = config.kafka.brokers.as_deref().expect("kafka brokers set");
        let (host, port) = host_port(brokers);
        assert!(services.contains(&host), "{app}: broker host {host}");
        let advertised =
            environment(&c["services"][host.as_str()])["KAFKA_ADVERTISED_LISTENERS"].clone();
        assert!(
            advertised.contains(&format!("{host}:{port}")),
            "{app}: {brokers} vs {advertised}"
        );
        let (host, port) = host_port(&config.clickhouse.url);
        assert_eq!((host.as_str(), port), ("clickhouse", 8123), "{app}");
        let ch = environment(&c["services"]["clickhouse"]);
        assert_eq!(config.clickhouse.user, ch["CLICKHOUSE_USER"], "{app}");
        assert_eq!(
            config.clickhouse.password, ch["CLICKHOUSE_PASSWORD"],
            "{app}"
        );
        let (host, port) = host_port(config.redis.url.as_deref().expect("redis url set"));
        assert_eq!((host.as_str(), port), ("redis", 6379), "{app}");
        assert!(
            !config.tenants.is_empty(),
            "{app}: the shared file has tenants"
        );

        // What the healthcheck and the published port reach is where the process listens.
        let health = service["healthcheck"]["test"].as_sequence().map(|t| {
            t.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        });
        let listens = match app {
            "ingestor" => Some(config.listen.clone()),
            "aggregator" => Some(config.aggregator.listen.clone()),
            _ => None,
        };
        if let (Some(listen), Some(health)) = (listens, health) {
            let (ip, port) = host_port(&listen);
            assert_eq!(
                ip, "0.0.0.0",
                "{app} listens beyond the container's loopback"
            );
            assert!(
                health.contains(&format!("http://localhost:{port}/healthz")),
                "{app}: {health}"
            );
            if app == "ingestor" {
                let published = service["ports"][0].as_str().unwrap();
                assert!(published.ends_with(&format!(":{port}")), "{published}");
            }
        }
    }
}

#[test]
fn the_dockerfile_builds_the_locked_release_binary_and_runs_it_unprivileged() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    assert!(text.contains("cargo build --release --locked --bin mcp-meter"));
    assert!(text.contains("ENTRYPOINT [\"mcp-meter\"]"));
    assert!(text.contains("USER mcp-meter"));
    // The image has curl for the compose healthchecks.
    assert!(text.contains(" curl"));
    let ignore = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context skips target/"
    );
}
