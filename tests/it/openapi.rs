//! The OpenAPI document: the checked-in copy is what the code generates, every reference
//! resolves, every example fits its schema, real answers of a running `serve` fit theirs, and the
//! interactive docs are served from the binary alone.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn document() -> Value {
    serde_json::from_str(&ingestor::openapi::document()).unwrap()
}

#[test]
fn the_checked_in_document_is_what_the_code_generates() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == ingestor::openapi::document(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json` and commit it"
    );
}

/// Checks `value` against an OpenAPI 3.1 schema, in the subset utoipa writes: $ref, allOf,
/// oneOf, type (one or a list), properties, required, items, enum, maxLength, min/maxItems.
/// Answers the first mismatch with where it is.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: $ref {r} does not resolve"));
        }
        return check(doc, target, value, at);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, value, at)?;
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let misfits: Vec<String> = one
            .iter()
            .filter_map(|s| check(doc, s, value, at).err())
            .collect();
        let fits = one.len() - misfits.len();
        if fits != 1 {
            return Err(format!(
                "{at}: {value} fits {fits} of the oneOf schemas, not exactly one ({})",
                misfits.join("; ")
            ));
        }
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        if !fits {
            return Err(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(value) {
            return Err(format!("{at}: {value} is not one of {values:?}"));
        }
    }
    if let (Some(max), Some(s)) = (
        schema.get("maxLength").and_then(Value::as_u64),
        value.as_str(),
    ) {
        if s.encode_utf16().count() as u64 > max {
            return Err(format!("{at}: longer than {max}"));
        }
    }
    if let Some(object) = value.as_object() {
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap();
            if !object.contains_key(name) {
                return Err(format!("{at}: required `{name}` is missing"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, s) in props {
                if let Some(v) = object.get(name) {
                    check(doc, s, v, &format!("{at}.{name}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, v) in array.iter().enumerate() {
            check(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Every (path, method, status, media type) with its schema and example.
fn responses(doc: &Value) -> Vec<(String, String, String, String, Value, Value)> {
    let mut out = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, op) in methods.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    out.push((
                        path.clone(),
                        method.clone(),
                        status.clone(),
                        media.clone(),
                        content["schema"].clone(),
                        content.get("example").cloned().unwrap_or(Value::Null),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn every_reference_resolves_and_every_example_fits_its_schema() {
    let doc = document();
    let text = doc.to_string();
    for (at, _) in text.match_indices("#/components/schemas/") {
        let name: String = text[at + 21..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            doc["components"]["schemas"][&name].is_object(),
            "#/components/schemas/{name} does not resolve"
        );
    }
    // The checker itself refuses what does not fit.
    let summary = json!({"$ref": "#/components/schemas/Viewed_SummaryReport_UsageFigures_SummaryReport_SpendFigures"});
    let mut answer: Value = serde_json::from_str(
        r#"{"view":"tenant","from":"2026-11-21","to":"2026-11-21","calls":1,"errors":0,"revenueMicros":7550,"cogsMicros":1529,"grossProfitMicros":6021,"margin":null,"inputTokens":1200,"outputTokens":450,"durationMsSum":542,"avgDurationMs":542,"maxDurationMs":542,"sessions":1,"tools":1,"agents":1}"#,
    )
    .unwrap();
    check(&doc, &summary, &answer, "summary").unwrap();
    answer["view"] = json!("operator");
    assert!(check(&doc, &summary, &answer, "summary")
        .unwrap_err()
        .contains("fits 0 of the oneOf"));
    answer["view"] = json!("tenant");
    answer["calls"] = json!("1");
    assert!(check(&doc, &summary, &answer, "summary").is_err());
    answer.as_object_mut().unwrap().remove("calls");
    assert!(check(&doc, &summary, &answer, "summary")
        .unwrap_err()
        .contains("required `calls`"));
    let level = json!({"$ref": "#/components/schemas/MarginLevel"});
    assert!(check(&doc, &level, &json!("L4_PANIC"), "level").is_err());

    let mut examples = 0;
    for (path, method, status, media, schema, example) in responses(&doc) {
        if example.is_null() || media != "application/json" {
            continue;
        }
        check(
            &doc,
            &schema,
            &example,
            &format!("{method} {path} {status}"),
        )
        .unwrap();
        examples += 1;
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if let Some(example) = schema.get("example") {
            check(&doc, schema, example, name).unwrap();
            examples += 1;
        }
    }
    assert!(examples >= 12, "only {examples} examples");
    // Every operation says who may call it and documents its errors.
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, op) in methods.as_object().unwrap() {
            let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
            if op["tags"][0] == "operations" {
                continue; // /healthz, /readyz, /metrics: no key
            }
            assert!(op["security"].is_array(), "{method} {path} has no security");
            // 400 where there is something to get wrong: parameters or a body.
            let asks = op["parameters"].as_array().is_some_and(|p| !p.is_empty())
                || op.get("requestBody").is_some();
            for needed in ["400", "401", "403"] {
                if needed == "400" && !asks {
                    continue;
                }
                assert!(
                    statuses.iter().any(|s| *s == needed),
                    "{method} {path} lacks {needed}"
                );
            }
        }
    }
}

/// The schema of `path`'s answer with `status` in the document.
fn answer_schema(doc: &Value, path: &str, method: &str, status: u16) -> Value {
    doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
        ["schema"]
        .clone()
}

#[test]
fn real_answers_of_serve_fit_the_documented_schemas() {
    let doc = document();
    let s = Server::start();
    let mut event: Value = serde_json::from_str(SEED).unwrap();
    event["customerId"] = json!("cust_acme");
    let bad = json!({"metricName": "mcp_server.tool_invocations", "toolName": "t", "executionDurationMs": -5});
    let (status, answer) = s.post("/v1/ingest/batch", ACME, &batch(&[event.clone(), bad]));
    check(
        &doc,
        &answer_schema(&doc, "/v1/ingest/batch", "post", status),
        &answer,
        "batch",
    )
    .unwrap();
    let (status, answer) = s.post("/v1/ingest/events", ACME, &json!([event]).to_string());
    check(
        &doc,
        &answer_schema(&doc, "/v1/ingest/events", "post", status),
        &answer,
        "events",
    )
    .unwrap();
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let gets = [
        (
            "/analytics/mcp/revenue/by-tool",
            "/analytics/mcp/revenue/by-tool".to_string(),
        ),
        (
            "/analytics/mcp/by-agent",
            "/analytics/mcp/by-agent".to_string(),
        ),
        (
            "/analytics/mcp/summary",
            "/analytics/mcp/summary".to_string(),
        ),
        (
            "/analytics/mcp/sessions",
            "/analytics/mcp/sessions".to_string(),
        ),
        (
            "/analytics/mcp/sessions/{sessionId}",
            "/analytics/mcp/sessions/sess_abc123".to_string(),
        ),
        (
            "/analytics/mcp/sessions/{sessionId}",
            "/analytics/mcp/sessions/nope".to_string(),
        ),
        (
            "/analytics/mcp/summary",
            "/analytics/mcp/summary?from=yesterday".to_string(),
        ),
        (
            "/v1/exports/billing",
            format!("/v1/exports/billing?period={month}&format=json"),
        ),
        (
            "/v1/exports/billing",
            "/v1/exports/billing?period=13".to_string(),
        ),
        (
            "/v1/guard/check",
            "/v1/guard/check?agentId=agent_gpt4o_prod&sessionId=sess_abc123".to_string(),
        ),
        ("/v1/guard/check", "/v1/guard/check".to_string()),
        ("/healthz", "/healthz".to_string()),
        ("/readyz", "/readyz".to_string()),
    ];
    let (_, token) = s.post(
        "/v1/portal/tokens",
        ACME,
        r#"{"customerId":"cust_acme","expiresInSeconds":600}"#,
    );
    let token = token["token"].as_str().unwrap().to_string();
    for (documented, url) in gets {
        // With the tenant's key, and with a portal token where one may read.
        for key in [ACME, token.as_str()] {
            let (status, answer) = s.get(&url, key);
            if key == token && status == 403 {
                continue;
            }
            let schema = answer_schema(&doc, documented, "get", status);
            assert!(
                schema.is_object(),
                "{url} answered {status}, which is not documented"
            );
            check(&doc, &schema, &answer, &url).unwrap();
            if key == token {
                // `check` lets fields the schema does not list pass; a customer's must not have them.
                let text = answer.to_string();
                for cost in ["cogsMicros", "cogsUsd", "grossProfitMicros", "\"margin\""] {
                    assert!(
                        !text.contains(cost),
                        "{url} shows {cost} to a portal token: {text}"
                    );
                }
            }
        }
    }
    let (status, answer) = s.get("/analytics/mcp/summary", "wrong-key");
    check(
        &doc,
        &answer_schema(&doc, "/analytics/mcp/summary", "get", status),
        &answer,
        "401",
    )
    .unwrap();
}

#[test]
fn openapi_json_and_the_docs_are_served_by_the_binary_itself() {
    let s = Server::start();
    let (status, text) = s.get_text("/openapi.json", "");
    assert_eq!(status, 200);
    assert_eq!(text, ingestor::openapi::document());
    let (status, page) = s.get_text("/docs/", "");
    assert_eq!(status, 200);
    assert!(page.contains("swagger-ui-bundle.js"), "{page}");
    let (status, init) = s.get_text("/docs/swagger-initializer.js", "");
    assert_eq!(status, 200);
    assert!(init.contains("\"url\": \"/openapi.json\""), "{init}");
    let (status, bundle) = s.get_text("/docs/swagger-ui-bundle.js", "");
    assert_eq!(status, 200);
    assert!(
        bundle.len() > 100_000,
        "the Swagger UI bundle is vendored in the binary"
    );
    let (status, _) = s.get_text("/docs", "");
    assert_eq!(status, 200, "/docs redirects to /docs/");
}

/// `schema` with its `$ref` followed.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(
            doc,
            &doc["components"]["schemas"][r.trim_start_matches("#/components/schemas/")],
        ),
        None => schema,
    }
}

/// The `view` a oneOf branch is tagged with (`tenant`, `customer`), if it is tagged.
fn view_of(doc: &Value, branch: &Value) -> Option<String> {
    let branch = resolve(doc, branch);
    if let Some(tag) = branch["properties"]["view"]["enum"][0].as_str() {
        return Some(tag.to_string());
    }
    branch["allOf"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|part| view_of(doc, part))
}

/// Every property name a reader in `view` can receive under `schema`: branches of a oneOf
/// tagged for another view are not followed; everything else is.
fn reachable(doc: &Value, schema: &Value, view: &str, names: &mut BTreeSet<String>, depth: usize) {
    assert!(depth < 64, "the schema walk does not end: {schema}");
    let schema = resolve(doc, schema);
    for branch in schema["oneOf"].as_array().into_iter().flatten() {
        if view_of(doc, branch).is_none_or(|tag| tag == view) {
            reachable(doc, branch, view, names, depth + 1);
        }
    }
    for key in ["allOf", "anyOf", "prefixItems"] {
        for part in schema[key].as_array().into_iter().flatten() {
            reachable(doc, part, view, names, depth + 1);
        }
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        names.insert(name.clone());
        reachable(doc, property, view, names, depth + 1);
    }
    for key in ["items", "additionalProperties"] {
        if schema[key].is_object() {
            reachable(doc, &schema[key], view, names, depth + 1);
        }
    }
}

#[test]
fn no_schema_a_portal_token_reaches_has_a_cost_field() {
    let doc = document();
    // A cost field is one the operator's figures have and the customer's do not: a cost field
    // added to the operator's figures is one here without anyone listing it.
    let names = |schema: &str| {
        let mut names = BTreeSet::new();
        reachable(
            &doc,
            &json!({"$ref": format!("#/components/schemas/{schema}")}),
            "tenant",
            &mut names,
            0,
        );
        names
    };
    let mut costs: BTreeSet<String> = names("UsageFigures")
        .difference(&names("SpendFigures"))
        .cloned()
        .collect();
    costs.extend(
        names("BillingFigures")
            .difference(&names("BillingSpendFigures"))
            .cloned(),
    );
    for known in ["cogsMicros", "cogsUsd", "grossProfitMicros", "margin"] {
        assert!(
            costs.contains(known),
            "{known} is not found as a cost field: {costs:?}"
        );
    }

    let mut portal_operations = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for (method, op) in methods.as_object().unwrap() {
            let security = op["security"].as_array().cloned().unwrap_or_default();
            if !security.iter().any(|s| s.get("portal_token").is_some()) {
                continue;
            }
            let mut customer = BTreeSet::new();
            let mut tenant = BTreeSet::new();
            for response in op["responses"].as_object().unwrap().values() {
                for content in response["content"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(_, c)| c)
                {
                    reachable(&doc, &content["schema"], "customer", &mut customer, 0);
                    reachable(&doc, &content["schema"], "tenant", &mut tenant, 0);
                }
            }
            let leaked: Vec<&String> = customer.intersection(&costs).collect();
            assert!(
                leaked.is_empty(),
                "{method} {path} takes a portal token and its answers can carry {leaked:?}"
            );
            if path.starts_with("/analytics/") || path.starts_with("/v1/exports/") {
                // The walk does find cost fields where a tenant key reads them.
                assert!(tenant.contains("cogsMicros"), "{method} {path}: {tenant:?}");
            }
            portal_operations.push(format!("{method} {path}"));
        }
    }
    println!(
        "{} operations take a portal token: {portal_operations:?}",
        portal_operations.len()
    );
    assert!(portal_operations.len() >= 8, "{portal_operations:?}");
}
