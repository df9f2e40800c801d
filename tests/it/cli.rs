//! The command line: keys, the demo's loopback rule, config errors reported all at once.

use std::process::Command;

fn mcp_meter(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(args)
        .env_remove("MCP_METER_CONFIG")
        .env_remove("MCP_METER_LISTEN")
        .output()
        .unwrap()
}

#[test]
fn keys_new_prints_a_key_and_its_sha256() {
    let out = mcp_meter(&["keys", "new"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let key = field("key:");
    assert!(key.starts_with("mcpm_") && key.len() == 5 + 64, "{key}");
    assert_eq!(field("sha256:"), mcp_meter::sha256_hex(&key));
    assert_ne!(key, field_of_another_run(), "keys are random");
}

fn field_of_another_run() -> String {
    let out = mcp_meter(&["keys", "new"]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .next()
        .unwrap()[7..]
        .trim()
        .to_string()
}

#[test]
fn the_demo_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = mcp_meter(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only listens on loopback"), "{err}");
}

/// `--listen localhost:PORT` is a loopback address like 127.0.0.1: the demo serves on it.
#[test]
fn serve_listens_on_a_host_name_that_resolves() {
    use crate::common::distributed::{serve_base, spawn_with_url};
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--listen", "localhost:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("MCP_METER_CONFIG")
        .env_remove("MCP_METER_LISTEN");
    let (mut child, first) = spawn_with_url(command, serve_base);
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.contains("http://127.0.0.1:") || first.contains("http://[::1]:"),
        "{first}"
    );
    // A host that does not resolve is refused, saying so.
    let out = mcp_meter(
        &[
            "serve",
            "--listen",
            "no-such-host.invalid:8080",
            "--data-dir",
        ]
        .into_iter()
        .chain([dir.path().to_str().unwrap()])
        .collect::<Vec<_>>(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host `no-such-host.invalid` does not resolve"),
        "{err}"
    );
}

#[test]
fn a_bad_config_file_reports_every_problem_and_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"
listen = "not-an-address"
[ingest]
max_batch_events = 5000
[[tenants]]
id = "has space"
api_keys = [{ name = "k", sha256 = "abc", scopes = ["ingest"] }]
"#,
    )
    .unwrap();
    let out = mcp_meter(&["serve", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        "the config has 5 problem(s)",
        "listen `not-an-address`",
        "ingest.max_batch_events must be 1 to 1000",
        "id must be 1 to 64 letters",
        "sha256 must be 64 lower-case hex",
        "has no rate_plans",
    ] {
        assert!(err.contains(wanted), "missing `{wanted}` in:\n{err}");
    }
    // Two parse errors: the first is reported with its line, and the answer says the next
    // ones come once it is fixed.
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[ingest]\nmax_batch_event = 10\n[kafka]\npartitions = \"six\"\n",
    )
    .unwrap();
    let out = mcp_meter(&["serve", "--config", typo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `max_batch_event`"), "{err}");
    assert!(err.contains("line 2"), "{err}");
    assert!(
        err.contains("parsing stops at the first error like this one: fix it and run again"),
        "{err}"
    );
}

/// The variables a user may set, beside the config table's: the flags', the log filter, and the
/// proxy's customer token secret (read from the environment only).
const FLAG_VARIABLES: [&str; 12] = [
    "MCP_METER_LOG_FORMAT",
    "MCP_METER_LISTEN",
    "MCP_METER_PROXY_LISTEN",
    "MCP_METER_DATA_DIR",
    "MCP_METER_CONFIG",
    "MCP_METER_DEMO_KEY",
    "MCP_METER_LOG",
    "MCP_METER_PROXY_METER_URL",
    "MCP_METER_PROXY_API_KEY",
    "MCP_METER_PROXY_CUSTOMER",
    "MCP_METER_PROXY_TENANT",
    "MCP_METER_PROXY_CUSTOMER_SECRET",
];

/// Every `MCP_METER_*` the README names is one the binary reads, and the reverse.
#[test]
fn the_readme_names_exactly_the_variables_the_binary_reads() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let known: std::collections::BTreeSet<&str> = schemas::config::env_overrides()
        .iter()
        .map(|o| o.var.as_str())
        .chain(FLAG_VARIABLES)
        .collect();
    let mut named = std::collections::BTreeSet::new();
    for (at, _) in readme.match_indices("MCP_METER_") {
        let var: String = readme[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `MCP_METER_*` and `MCP_METER_PROXY_*` name families, not variables;
        // `MCP_METER_TEST_*` are the tests'.
        if !["MCP_METER_", "MCP_METER_PROXY_"].contains(&var.as_str())
            && !var.starts_with("MCP_METER_TEST_")
        {
            named.insert(var);
        }
    }
    let unknown: Vec<&String> = named
        .iter()
        .filter(|v| !known.contains(v.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the README names variables nothing reads: {unknown:?}"
    );
    let undocumented: Vec<&&str> = known.iter().filter(|v| !named.contains(**v)).collect();
    assert!(
        undocumented.is_empty(),
        "the README does not name: {undocumented:?}"
    );
}

/// Every variable is documented in the help of some command that reads it.
#[test]
fn every_environment_variable_is_in_some_commands_help() {
    let help: String = [
        "serve",
        "ingestor",
        "aggregator",
        "migrate",
        "retention",
        "proxy",
    ]
    .iter()
    .map(|c| String::from_utf8(mcp_meter(&[c, "--help"]).stdout).unwrap())
    .collect();
    for o in schemas::config::env_overrides() {
        assert!(help.contains(&o.var), "{} is in no command's --help", o.var);
    }
    for var in FLAG_VARIABLES {
        assert!(help.contains(var), "{var} is in no command's --help");
    }
}

/// `mcp-meter retention --dry-run` lists what would go and drops nothing; without it, it drops.
#[test]
fn retention_dry_run_lists_what_would_go_and_the_real_run_drops_it() {
    use backends::sink::TenantBatch;
    use backends::store::{sqlite, StoreWriter};
    use schemas::event::RatedEvent;
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let day = 86_400_000;
    actix_web::rt::System::new().block_on(async {
        let (mut writer, _) = sqlite::open(dir.path(), &Default::default()).unwrap();
        let events = (0..5)
            .map(|i| {
                RatedEvent::sample_call(&format!("k{i}"), now - if i < 3 { 90 * day } else { 0 })
            })
            .collect();
        writer
            .write(&[TenantBatch::new("demo".into(), events)])
            .await
            .unwrap();
    });
    let run = |dry_run: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
        command
            .args(["retention", "--data-dir", dir.path().to_str().unwrap()])
            .env_remove("MCP_METER_CONFIG")
            .env("MCP_METER_RETENTION_RAW_DAYS", "60");
        if dry_run {
            command.arg("--dry-run");
        }
        let out = command.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let rows = || {
        rusqlite::Connection::open(dir.path().join(sqlite::DB_FILE))
            .unwrap()
            .query_row("SELECT count(*) FROM mcp_events", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
    };
    let planned = run(true);
    assert!(
        planned.contains("dedup keys 40 days, raw events 60 days"),
        "{planned}"
    );
    assert!(
        planned.contains("would drop mcp_events events that occurred before"),
        "{planned}"
    );
    assert!(planned.contains("(3 rows)"), "{planned}");
    assert_eq!(rows(), 5);
    let done = run(false);
    assert!(
        done.contains("dropped mcp_events") && done.contains("(3 rows)"),
        "{done}"
    );
    assert_eq!(rows(), 2);
    assert!(run(false).contains("nothing to drop"));
}

/// Each subcommand's `--help` lists its own flags, each with a description, and only the
/// environment it reads: a flag's variable only where the flag exists, config overrides only
/// of the sections the command uses.
#[test]
fn each_subcommands_help_lists_only_its_flags_and_the_environment_it_reads() {
    // (subcommand, config sections whose MCP_METER_* overrides it reads)
    let commands: &[(&[&str], &[&str])] = &[
        (
            &["serve"],
            &[
                "STORE",
                "CLICKHOUSE_",
                "SQLITE_",
                "RETENTION_",
                "INGEST_",
                "MARGIN_GUARD_",
                "CREDITS_",
                "PORTAL_",
                "HTTP_",
                "RATE_LIMITS_",
            ],
        ),
        (
            &["ingestor"],
            &[
                "CLICKHOUSE_",
                "KAFKA_",
                "REDIS_",
                "INGEST_",
                "MARGIN_GUARD_",
                "CREDITS_",
                "PORTAL_",
                "HTTP_",
                "RATE_LIMITS_",
            ],
        ),
        (
            &["aggregator"],
            &[
                "CLICKHOUSE_",
                "KAFKA_",
                "REDIS_",
                "MARGIN_GUARD_",
                "RETENTION_",
                "AGGREGATOR_",
            ],
        ),
        (&["migrate"], &["CLICKHOUSE_", "KAFKA_"]),
        (
            &["retention"],
            &["STORE", "CLICKHOUSE_", "RETENTION_", "INGEST_"],
        ),
        (&["loadgen"], &[]),
        (&["openapi"], &[]),
        (&["keys", "new"], &[]),
        (&["proxy"], &[]),
    ];
    for (command, sections) in commands {
        // The variables that stand for flags: the proxy's address is its own, so that a proxy
        // started beside `serve` does not take the meter's.
        let proxy = *command == ["proxy"];
        let (listen, other_listen) = if proxy {
            ("MCP_METER_PROXY_LISTEN", "MCP_METER_LISTEN")
        } else {
            ("MCP_METER_LISTEN", "MCP_METER_PROXY_LISTEN")
        };
        let flag_vars = [
            ("--listen", listen),
            ("--data-dir", "MCP_METER_DATA_DIR"),
            ("--config", "MCP_METER_CONFIG"),
            ("--demo-key", "MCP_METER_DEMO_KEY"),
            ("--meter-url", "MCP_METER_PROXY_METER_URL"),
            ("--api-key", "MCP_METER_PROXY_API_KEY"),
            ("--customer", "MCP_METER_PROXY_CUSTOMER"),
            ("--tenant", "MCP_METER_PROXY_TENANT"),
        ];
        // Read from the environment only: a secret given as a flag would show in `ps`.
        let env_only: &[&str] = if proxy {
            &["MCP_METER_PROXY_CUSTOMER_SECRET"]
        } else {
            &[]
        };
        let out = mcp_meter(&[*command, &["--help"]].concat());
        assert!(out.status.success(), "{command:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = help.lines().collect();
        // Every option has a description: the line after it is text, not `[env: …]`.
        let options: Vec<&str> = lines
            .iter()
            .map(|l| l.trim_start())
            .filter(|l| l.starts_with("--") || l.starts_with("-h, --help"))
            .collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("--") && line.starts_with("      --") {
                let next = lines[i + 1].trim();
                assert!(
                    !next.is_empty() && !next.starts_with('['),
                    "{command:?}: `{}` has no description",
                    line.trim()
                );
            }
        }
        let has_flag = |flag: &str| options.iter().any(|o| o.starts_with(&format!("{flag} ")));
        for (flag, var) in flag_vars {
            assert_eq!(
                has_flag(flag),
                help.contains(var),
                "{command:?}: {var} listed {} while --{flag} is {}",
                help.contains(var),
                if has_flag(flag) {
                    "a flag"
                } else {
                    "not a flag"
                }
            );
        }
        assert!(
            !help.contains(other_listen),
            "{command:?} lists {other_listen}, which it does not read"
        );
        // Config overrides: only of the sections the command reads.
        for var in help
            .split(|c: char| !(c.is_ascii_uppercase() || c == '_'))
            .filter(|w| w.starts_with("MCP_METER_"))
            // `MCP_METER_PROXY_*` names the proxy's family (kept from its stdio child).
            .filter(|w| *w != "MCP_METER_PROXY_")
        {
            let name = &var["MCP_METER_".len()..];
            let own = flag_vars.iter().any(|(_, v)| *v == var)
                || env_only.contains(&var)
                || name.starts_with("LOG");
            assert!(
                own || sections.iter().any(|s| name.starts_with(s)),
                "{command:?} lists {var}, which it does not read"
            );
        }
        for section in *sections {
            assert!(
                help.contains(&format!("MCP_METER_{section}")),
                "{command:?} does not list MCP_METER_{section}…"
            );
        }
    }
}

/// `serve`'s banner lists the API, the dashboard and the operations endpoints; its log, written to a file, carries no
/// colour codes and one access line per request, failed authentication included, with no key.
#[test]
fn serve_banner_lists_operations_and_its_log_is_plain_with_an_access_line_per_request() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let secret = "demo-key-that-must-not-be-logged";
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--demo-key",
            secret,
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .env_remove("MCP_METER_CONFIG")
        .env_remove("MCP_METER_LISTEN")
        .env("MCP_METER_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let banner: Vec<String> = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .take_while(|l| !l.starts_with("demo tenant"))
        .collect();
    let banner = banner.join("\n");
    // Every place a first hour needs: the API's groups, the dashboard, the operations.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs/",
        "/dashboard/",
        "/analytics/mcp/timeseries",
        "/v1/customers/{customerId}/credits",
        "/v1/customers/{customerId}/balance",
        "/v1/authorize",
        "/v1/portal/tokens",
        "/v1/exports/billing",
    ] {
        assert!(banner.contains(path), "the banner lacks {path}:\n{banner}");
    }
    let base = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(|u| u[..u.find("/v1/").unwrap()].to_string())
        .unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let wrong = agent
        .get(format!("{base}/analytics/mcp/summary"))
        .header("X-API-Key", "not-a-key")
        .call()
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = agent
        .get(format!("{base}/analytics/mcp/summary?from=2026-11-01"))
        .header("Authorization", format!("Bearer {secret}"))
        .call()
        .unwrap();
    assert_eq!(right.status().as_u16(), 200);
    // The log is written as requests end; give it a moment, then stop.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("access") && l.contains("/analytics/mcp/summary"))
        .collect();
    assert_eq!(access.len(), 2, "{text}");
    assert!(
        access[0].contains("status=401") && access[0].contains("INFO"),
        "{}",
        access[0]
    );
    assert!(access[1].contains("status=200"), "{}", access[1]);
    assert!(
        !text.contains(secret) && !text.contains("not-a-key"),
        "a key in the log:\n{text}"
    );
    assert!(
        !text.contains("from=2026"),
        "query strings stay out of the log:\n{text}"
    );
}

/// `keys new --scopes --name` prints the config block with them, one that a config accepts
/// as the key it printed; scopes are checked against the names a config takes.
#[test]
fn keys_new_prints_the_block_with_the_scopes_and_name_asked_for() {
    let out = mcp_meter(&[
        "keys",
        "new",
        "--scopes",
        "ingest,read,ingest",
        "--name",
        "sdk-prod",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim();
    let block = &text[text.find("[[tenants.api_keys]]").unwrap()..];
    assert!(
        block.contains("name = \"sdk-prod\"\n")
            && block.contains("scopes = [\"ingest\", \"read\"]\n"),
        "{text}"
    );
    let config = schemas::config::Config::from_toml(&format!(
        "[[tenants]]\nid = \"t\"\n{block}\n[[tenants.rate_plans]]\nversion = 1\n\
[tenants.rate_plans.tools.\"*\"]\nprice = {{ per_call = 1 }}\n"
    ))
    .unwrap();
    config.validate().unwrap();
    let printed = &config.tenants[0].api_keys[0];
    assert_eq!(printed.sha256, mcp_meter::sha256_hex(key));
    assert_eq!(
        printed.scopes,
        [schemas::config::Scope::Ingest, schemas::config::Scope::Read]
    );
    // Without flags: an ingest key, as before.
    let plain = String::from_utf8(mcp_meter(&["keys", "new"]).stdout).unwrap();
    assert!(plain.contains("scopes = [\"ingest\"]\n"), "{plain}");
    // A scope the config would refuse is refused here, naming the ones there are.
    let out = mcp_meter(&["keys", "new", "--scopes", "ingest,reed"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`reed` is not a scope; give ingest, read, export, admin"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no key is printed for a refused scope"
    );
    // Its help says what each scope allows, and that admin holds them all.
    let help = String::from_utf8(mcp_meter(&["keys", "new", "--help"]).stdout).unwrap();
    assert!(help.contains("every other scope"), "{help}");
}

/// `serve --config <file>` started with its log read until `until` matches a line or 20 s
/// pass (a server never ends its log by itself), then killed: the lines read.
fn serve_log_until(dir: &std::path::Path, file: &std::path::Path, until: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("MCP_METER_CONFIG")
        .env_remove("MCP_METER_LISTEN")
        .env("MCP_METER_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, seen) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut log = Vec::new();
    while let Ok(line) =
        seen.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        let done = line.contains(until);
        log.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    log
}

/// A config with no tenant starts, but `serve` warns at start that nothing can be called, and
/// says what to add; with a tenant, it does not.
#[test]
fn serve_warns_at_start_when_the_config_has_no_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.toml");
    std::fs::write(&file, "").unwrap();
    // The warning comes before the server starts listening.
    let log = serve_log_until(dir.path(), &file, "starting service");
    let warning = log
        .iter()
        .find(|l| l.contains("WARN") && l.contains("no tenant"))
        .unwrap_or_else(|| {
            panic!(
                "serve did not warn of a config with no tenant:\n{}",
                log.join("\n")
            )
        });
    for wanted in ["[[tenants]]", "[[tenants.api_keys]]", "mcp-meter keys new"] {
        assert!(warning.contains(wanted), "`{wanted}` not in: {warning}");
    }
    let file = dir.path().join("one.toml");
    std::fs::write(&file, crate::common::config_text(&dir.path().join("data2"))).unwrap();
    let log = serve_log_until(dir.path(), &file, "starting service");
    assert!(
        log.iter().any(|l| l.contains("starting service")),
        "{}",
        log.join("\n")
    );
    assert!(
        !log.iter().any(|l| l.contains("no tenant")),
        "{}",
        log.join("\n")
    );
}

/// A config error prints its message alone, whatever RUST_BACKTRACE says, and exits 2.
#[test]
fn a_config_error_prints_its_message_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \"no-port\"\n").unwrap();
    for backtrace in ["1", "full", "0"] {
        for command in ["serve", "ingestor", "aggregator", "migrate"] {
            let out = Command::new(env!("CARGO_BIN_EXE_mcp-meter"))
                .args([command, "--config"])
                .arg(&file)
                .env_remove("MCP_METER_LISTEN")
                .env("RUST_BACKTRACE", backtrace)
                .env("RUST_LIB_BACKTRACE", backtrace)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command}: {err}");
            assert!(
                err.starts_with("mcp-meter: the config has 1 problem(s)")
                    && err.contains("listen `no-port` has no port"),
                "{command}: {err}"
            );
            assert!(
                !err.to_lowercase().contains("backtrace") && err.lines().count() <= 3,
                "{command} RUST_BACKTRACE={backtrace}: {err}"
            );
        }
    }
}

/// `serve` on ClickHouse says what it runs: one process writing ClickHouse itself, no Kafka, no
/// aggregator, its state in memory (not the SQLite "embedded mode").
#[test]
fn serve_on_clickhouse_says_what_it_runs() {
    use crate::common::distributed::spawn_with_url;
    let dir = tempfile::tempdir().unwrap();
    let database = crate::common::unique_database("banner");
    let config = crate::common::clickhouse_config(dir.path(), &database);
    let file = dir.path().join("mcp-meter.toml");
    std::fs::write(&file, crate::common::config_text(dir.path())).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-meter"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .env_remove("MCP_METER_LISTEN")
        .env("MCP_METER_STORE", "clickhouse")
        .env("MCP_METER_CLICKHOUSE_URL", &config.clickhouse.url)
        .env("MCP_METER_CLICKHOUSE_DATABASE", &database);
    let (mut child, first) = spawn_with_url(command, |l| {
        l.starts_with("mcp-meter serve:").then(|| l.to_string())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(!first.contains("embedded mode"), "{first}");
    for wanted in [
        "one process writing ClickHouse",
        &database,
        "no Kafka",
        "memory",
    ] {
        assert!(first.contains(wanted), "`{wanted}` not in: {first}");
    }
}
