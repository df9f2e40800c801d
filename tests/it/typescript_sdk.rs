//! The TypeScript SDK (`sdks/typescript`, `withMetering`) end to end: a real MCP server on the
//! official SDK, metered by it, driven by the official MCP client over stdio and over
//! Streamable HTTP, against the real `serve`. The driver (`test/e2e/drive.ts`) prints what the
//! client saw and how often each handler ran; this side compares it with mcp-meter's figures.
//!
//! Short sessions over stdio (`test/e2e/once.ts`): the README's example server, compiled as a
//! user copies it, gets one call and then its client closes stdin, or it gets SIGTERM; what the
//! meter held must be in `serve`'s store by the time the process has ended, and a paid call
//! must have settled its reservation.
//!
//! `scripts/test` builds the SDK (`npm ci`, `npm run build`) first; without the build these
//! tests fail rather than skip.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// On the test plan a call with 10 input and 20 output tokens (what the driver's server
/// reports) is priced 5000 + 10 + 60.
const RATED_CALL: i64 = 5070;

fn drive(s: &Server, key: &str, customer: &str, scenario: &str, mode: &str) -> Value {
    drive_at(&s.base, key, customer, scenario, mode, &[])
}

/// Runs the driver `scenario` in `mode` against the mcp-meter at `base`, with `env` added;
/// answers the JSON line it prints.
fn sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sdks/typescript")
}

/// `path`, a file the SDK's build makes.
fn built(path: &Path) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run scripts/test, which builds the TypeScript SDK",
        path.display()
    );
    path.to_path_buf()
}

pub fn drive_at(
    base: &str,
    key: &str,
    customer: &str,
    scenario: &str,
    mode: &str,
    env: &[(&str, &str)],
) -> Value {
    let driver = built(&sdk().join("dist/test/e2e/drive.js"));
    let out = Command::new("node")
        .arg(&driver)
        .args([scenario, mode])
        .env("MCP_METER_URL", base)
        .env("MCP_METER_KEY", key)
        .env("MCP_METER_CUSTOMER", customer)
        .env("MCP_METER_BIN", env!("CARGO_BIN_EXE_mcp-meter"))
        .envs(env.iter().copied())
        .output()
        .expect("node runs (Node.js 18 or later)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the driver failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// 100 calls of 3 tools (some throwing, some answering isError) over each transport: the
/// analytics show every call, the right error counts, and the rated revenue.
#[test]
fn every_call_over_stdio_and_streamable_http_is_metered_with_its_status() {
    for mode in ["stdio", "http"] {
        let s = Server::start();
        let result = drive(&s, ACME, "cust-ts", "usage", mode);
        metered_as_driven(&s, ACME, &result, RATED_CALL, mode);
        let (_, sessions) = s.get("/analytics/mcp/sessions", ACME);
        assert_eq!(
            sessions["sessions"].as_array().unwrap().len(),
            1,
            "{mode}: {sessions}"
        );
        println!("{mode}: {result}");
    }
}

/// The usage scenario's calls as mcp-meter reports them: per tool the calls and errors the
/// driver expected, one event per handler run, each call rated at `rated_call`; 100 in all.
pub fn metered_as_driven(s: &Server, key: &str, result: &Value, rated_call: i64, label: &str) {
    let (_, report) = s.get("/analytics/mcp/revenue/by-tool", key);
    let tools = report["tools"].as_array().unwrap();
    let mut total = 0;
    for tool in ["search", "flaky", "lookup"] {
        let expected = &result["expected"][tool];
        let row = tools
            .iter()
            .find(|t| t["toolName"] == tool)
            .unwrap_or_else(|| panic!("{label}: no row for {tool}: {report}"));
        assert_eq!(row["calls"], expected["calls"], "{label} {tool}");
        assert_eq!(row["errors"], expected["errors"], "{label} {tool}");
        assert_eq!(
            row["calls"], result["runs"][tool],
            "{label} {tool}: one event per handler run"
        );
        assert_eq!(
            row["revenueMicros"].as_i64().unwrap(),
            row["calls"].as_i64().unwrap() * rated_call,
            "{label} {tool}"
        );
        total += row["calls"].as_i64().unwrap();
    }
    assert_eq!(total, 100, "{label}");
}

/// A session limit kills the session; the next call is refused by the SDK without its handler
/// running.
#[test]
fn a_killed_session_is_refused_without_running_the_handler() {
    let s = crate::credits::serve_with(
        "[[tenants.limits]]\nper = \"session\"\nwindow = \"hour\"\nmax_calls = 3\n",
    );
    let result = drive(&s, INITECH, "cust-ts", "kill", "http");
    println!("{result}");
    // Three calls within the limit and the one that breached it ran; the next was refused.
    assert_eq!(result["answered"], 4, "{result}");
    assert_eq!(result["refusedAt"], 4, "{result}");
    assert_eq!(
        result["runs"]["search"], 4,
        "the refused call never reached its handler"
    );
    let (_, summary) = s.get("/analytics/mcp/summary", INITECH);
    assert_eq!(
        summary["calls"], 4,
        "usage past the limit is stored and billed"
    );
}

/// A paid tool with a balance for 3 calls runs 3 times; the 4th is refused with the terms; the
/// balance afterwards is the grant minus 3 rated calls.
#[test]
fn a_paid_tool_runs_while_the_balance_lasts_and_then_answers_the_terms() {
    let s = Server::start();
    let grant = 3 * RATED_CALL;
    let (status, answer) = crate::credits::grant(&s, ACME, "cust-paid", grant, "g-ts");
    assert_eq!(status, 201, "{answer}");
    let result = drive(&s, ACME, "cust-paid", "paid", "http");
    println!("{result}");
    let results = result["results"].as_array().unwrap();
    let refused: Vec<bool> = results.iter().map(|r| r["isError"] == true).collect();
    assert_eq!(refused, [false, false, false, true], "{result}");
    let terms = &results[3]["terms"];
    assert_eq!(terms["reason"], "insufficient_balance", "{result}");
    assert_eq!(terms["quoteMicros"], 5000);
    assert_eq!(result["runs"]["premium"], 3);
    let balance = crate::credits::balance(&s, ACME, "cust-paid");
    assert_eq!(balance["settledMicros"], 3 * RATED_CALL);
    assert_eq!(balance["availableMicros"], grant - 3 * RATED_CALL);
    assert_eq!(balance["reservedMicros"], 0);
}

/// The first `ts` block of the SDK's README, as a user copies it, compiled (strict) in a project
/// of its own whose `node_modules` links this checkout's SDK and the MCP SDK, zod and Node types
/// it was built with. Answers the project (removed on drop) and the compiled example.
fn readme_example() -> (tempfile::TempDir, PathBuf) {
    let sdk = sdk();
    let readme = std::fs::read_to_string(sdk.join("README.md")).unwrap();
    let example: String = readme
        .lines()
        .skip_while(|line| *line != "```ts")
        .skip(1)
        .take_while(|line| *line != "```")
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(
        example.contains("withMetering"),
        "no ts example in the README"
    );
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    std::fs::write(dir.join("example.ts"), example).unwrap();
    std::fs::write(dir.join("package.json"), r#"{"type":"module"}"#).unwrap();
    std::fs::write(
        dir.join("tsconfig.json"),
        r#"{"compilerOptions":{"target":"ES2022","module":"NodeNext","moduleResolution":"NodeNext",
            "strict":true,"skipLibCheck":true,"types":["node"]},"files":["example.ts"]}"#,
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("node_modules/@types")).unwrap();
    let link = |target: &Path, name: &str| {
        std::os::unix::fs::symlink(built(target), dir.join("node_modules").join(name)).unwrap()
    };
    link(&sdk, "mcp-meter-sdk");
    for name in ["@modelcontextprotocol", "zod", "@types/node"] {
        link(&sdk.join("node_modules").join(name), name);
    }
    let tsc = built(&sdk.join("node_modules/typescript/bin/tsc"));
    let out = Command::new("node")
        .arg(tsc)
        .args(["-p", "tsconfig.json"])
        .current_dir(dir)
        .output()
        .expect("node runs");
    assert!(
        out.status.success(),
        "the README's example does not compile:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let compiled = dir.join("example.js");
    (project, compiled)
}

/// One call of `tool` to the stdio server `server` (a script run with node), then `end`
/// (`stdin` or `SIGTERM`), with the meter at `base`; answers `once.js`'s line: the answer,
/// how the server ended (`code`, `signal`), in how long (`endMs`), its stderr.
fn once(base: &str, customer: &str, end: &str, tool: &str, args: &str, server: &Path) -> Value {
    let client = built(&sdk().join("dist/test/e2e/once.js"));
    let out = Command::new("node")
        .arg(client)
        .args([end, tool, args, "node"])
        .arg(server)
        .env("MCP_METER_URL", base)
        .env("MCP_METER_KEY", ACME)
        .env("MCP_METER_CUSTOMER", customer)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "once.js failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// The README's example server, called once by a client that then closes its stdin, ends by
/// itself (status 0) with the call and the session's end in `serve`'s store; sent SIGTERM
/// instead, it delivers them too, then dies of SIGTERM as it would unmetered.
#[test]
fn the_readme_example_delivers_a_one_call_session_when_stdin_closes_or_sigterm_comes() {
    let (_project, example) = readme_example();
    for (end, code, signal) in [
        ("stdin", Value::from(0), Value::Null),
        ("SIGTERM", Value::Null, Value::from("SIGTERM")),
    ] {
        let s = Server::start();
        let out = once(
            &s.base,
            "",
            end,
            "forecast",
            r#"{"city":"Paris"}"#,
            &example,
        );
        println!("{end}: {out}");
        assert_eq!(
            out["answer"]["content"][0]["text"], "Sunny in Paris",
            "{out}"
        );
        assert_eq!(
            (&out["code"], &out["signal"]),
            (&code, &signal),
            "{end}: {out}"
        );
        let (_, report) = s.get("/analytics/mcp/revenue/by-tool", ACME);
        let calls: Vec<(&Value, &Value)> = report["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (&t["toolName"], &t["calls"]))
            .collect();
        assert_eq!(
            calls,
            [(&Value::from("forecast"), &Value::from(1))],
            "{end}: {report}"
        );
        let (_, sessions) = s.get("/analytics/mcp/sessions", ACME);
        let sessions = sessions["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{end}: {sessions:?}");
        assert_eq!(sessions[0]["agentId"], "once-agent", "{end}");
        assert_eq!(
            sessions[0]["ended"], true,
            "{end}: SESSION_END was delivered"
        );
    }
}

/// A paid tool called once over stdio, the client then closing stdin: the server ends by
/// itself and the call's event has settled its authorization at the rated amount; nothing
/// stays reserved.
#[test]
fn a_paid_call_of_a_one_call_stdio_session_settles_its_reservation() {
    let s = Server::start();
    let (status, answer) = crate::credits::grant(&s, ACME, "cust-once", 2 * RATED_CALL, "g-once");
    assert_eq!(status, 201, "{answer}");
    let server = built(&sdk().join("dist/test/e2e/stdio-server.js"));
    let out = once(&s.base, "cust-once", "stdin", "premium", "{}", &server);
    println!("{out}");
    assert_eq!(
        out["answer"]["content"][0]["text"], "premium answer",
        "{out}"
    );
    assert_eq!(out["code"], 0, "{out}");
    assert!(
        out["stderr"].as_str().unwrap().contains(r#""premium":1"#),
        "the handler ran once: {out}"
    );
    let balance = crate::credits::balance(&s, ACME, "cust-once");
    println!("{balance}");
    assert_eq!(balance["settledMicros"], RATED_CALL, "{balance}");
    assert_eq!(balance["reservedMicros"], 0, "{balance}");
    assert_eq!(balance["inFlight"], 0, "{balance}");
}
