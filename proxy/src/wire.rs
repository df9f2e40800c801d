//! What the proxy lets through from a client. The proxy is a security boundary: a message it
//! cannot read is one it cannot meter, so nothing passes that the proxy did not parse, and
//! what it parsed is what the server gets.
//!
//! - A body or line serde_json refuses (a lone surrogate `"\ud800"`, a number out of range
//!   `1e400`, bytes that are not UTF-8, trailing garbage) is answered with a JSON-RPC parse
//!   error (-32700) and never forwarded. JavaScript's and Python's parsers accept some of
//!   these; the server would run a call the proxy never saw.
//! - A leading UTF-8 byte order mark is the one leniency: it is dropped, and the rest goes on.
//! - A `tools/call` must carry an id the proxy can match with its answer, whatever the
//!   server's language: a string, or an integer a JavaScript number holds exactly
//!   (|n| ≤ 2^53 − 1; `1.0` is the integer 1). Fractions, larger numbers, `null` and any
//!   other id, a missing id (a call sent as a notification) and a tool name that is not a
//!   string an event can carry are refused with -32600.
//! - Every message is an object, a batch is not empty, and no object the server acts on (the
//!   message, its `params`, their `_meta`) has two keys that differ only in case: a Go server
//!   matches keys without regard to case, and would read `"METHOD":"tools/call"` in what the
//!   proxy reads as a `ping`. Such bodies are refused whole with -32600.

use serde_json::{json, Value};

/// The largest integer every JSON peer reads exactly (JavaScript's `Number.MAX_SAFE_INTEGER`).
pub const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A JSON-RPC error answer.
pub fn error(id: &Value, code: i64, message: String) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// Reads a client's body or line: the message (or batch) and the bytes to forward (without a
/// byte order mark), or the error to answer instead, when the proxy cannot parse it or a server
/// could read it otherwise ([`shape`]).
pub fn read(bytes: &[u8]) -> Result<(Value, &[u8]), Value> {
    let (value, forwarded) = parse(bytes)?;
    shape(&value)?;
    Ok((value, forwarded))
}

/// The -32600 error of a body or line refused whole, saying why.
pub fn refused_whole(why: &str) -> Value {
    error(
        &Value::Null,
        -32600,
        format!("mcp-meter proxy: {why}; nothing was forwarded"),
    )
}

fn parse(bytes: &[u8]) -> Result<(Value, &[u8]), Value> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => Ok((value, bytes)),
        Err(e) => Err(error(
            &Value::Null,
            -32700,
            format!("mcp-meter proxy: the message is not JSON it can read ({e}); nothing was forwarded. Send UTF-8 JSON without lone surrogates (\\ud800) or numbers out of range (1e400)"),
        )),
    }
}

/// The answer to a body or line over the size limit; nothing of it was forwarded.
pub fn too_large(limit: usize) -> Value {
    refused_whole(&format!("the message is over {limit} bytes"))
}

/// Refuses a body (a message or a batch) a server could read otherwise than the proxy does.
fn shape(value: &Value) -> Result<(), Value> {
    let members: Vec<&Value> = match value {
        Value::Array(batch) if batch.is_empty() => {
            return Err(refused_whole("the batch is empty"));
        }
        Value::Array(batch) => batch.iter().collect(),
        one => vec![one],
    };
    for message in members {
        let Value::Object(envelope) = message else {
            return Err(refused_whole("each message must be a JSON object"));
        };
        let params = envelope.get("params").and_then(Value::as_object);
        let metas = [
            envelope.get("_meta").and_then(Value::as_object),
            params
                .and_then(|p| p.get("_meta"))
                .and_then(Value::as_object),
        ];
        for object in [Some(envelope), params].into_iter().chain(metas).flatten() {
            let mut seen = std::collections::HashSet::new();
            for key in object.keys() {
                if !seen.insert(key.to_lowercase()) {
                    return Err(refused_whole(&format!(
                        "two keys are `{key}` but for case; a server may read either"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Whether an id can be matched with its answer by every peer.
fn matchable(id: &Value) -> bool {
    match id {
        Value::String(_) => true,
        Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| f.fract() == 0.0 && f.abs() <= MAX_SAFE_INTEGER),
        _ => false,
    }
}

/// A `tools/call` request's id and tool name (`Ok(Some)`), not a `tools/call` (`Ok(None)`), or
/// the -32600 error for a `tools/call` the proxy could not match or meter (`Err`).
pub fn tool_call(message: &Value) -> Result<Option<(&Value, &str)>, Value> {
    if message.get("method").and_then(Value::as_str) != Some("tools/call") {
        return Ok(None);
    }
    let id = message.get("id");
    let invalid = |why: &str| {
        let id = id.filter(|id| matchable(id)).unwrap_or(&Value::Null);
        error(
            id,
            -32600,
            format!("mcp-meter proxy: {why}; the call was not forwarded"),
        )
    };
    let Some(id) = id else {
        return Err(invalid(
            "a tools/call needs an id (it was sent as a notification)",
        ));
    };
    if !matchable(id) {
        return Err(invalid(&format!(
            "request id {id} is not a string or an integer of at most 2^53 - 1"
        )));
    }
    let Some(tool) = message.pointer("/params/name").and_then(Value::as_str) else {
        return Err(invalid(
            "a tools/call needs params.name, the tool's name as a string",
        ));
    };
    // A name its event cannot carry would run unbilled: refused, never fitted (a fitted name
    // would bill another tool).
    if tool.is_empty() {
        return Err(invalid("params.name is empty"));
    }
    if let Err(why) =
        schemas::event::check_text("params.name", tool, schemas::event::MAX_TOOL_NAME_LEN)
    {
        return Err(invalid(&why));
    }
    Ok(Some((id, tool)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_a_server_could_read_otherwise_is_refused_whole() {
        for body in [
            r#"[]"#,
            r#"[[{"id":1,"method":"tools/call","params":{"name":"t"}}]]"#,
            r#"[1]"#,
            r#""ping""#,
            r#"{"id":1,"method":"ping","METHOD":"tools/call","params":{"name":"t"}}"#,
            r#"{"id":1,"method":"tools/call","params":{"name":"free","Name":"premium"}}"#,
            r#"{"id":1,"method":"ping","params":{"_meta":{"a":1,"A":2}}}"#,
        ] {
            let refused = shape(&serde_json::from_str(body).unwrap()).unwrap_err();
            assert_eq!(refused["error"]["code"], -32600, "{body}: {refused}");
        }
        for body in [
            r#"{"id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1,"A":2}}}"#,
            r#"[{"id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#,
        ] {
            assert!(
                shape(&serde_json::from_str(body).unwrap()).is_ok(),
                "{body}"
            );
        }
    }

    #[test]
    fn what_serde_json_cannot_read_is_a_parse_error_and_a_bom_is_dropped() {
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"city":"\ud800"}}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"n":1e400}}}"#,
            b"{\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"\xff\"}}",
            br#"{"id":1,"method":"ping"} {"id":2}"#,
            b"",
        ] {
            let refused = parse(body).unwrap_err();
            assert_eq!(refused["error"]["code"], -32700, "{refused}");
        }
        let with_bom = b"\xEF\xBB\xBF{\"id\":1,\"method\":\"ping\"}";
        let (value, forwarded) = parse(with_bom).unwrap();
        assert_eq!(value["method"], "ping");
        assert_eq!(forwarded, &with_bom[3..]);
    }

    #[test]
    fn a_call_needs_an_id_every_peer_matches_and_a_tool_name() {
        let call = |id: &str, name: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"jsonrpc":"2.0",{id}"method":"tools/call","params":{{"name":{name}}}}}"#
            ))
            .unwrap()
        };
        for id in [
            r#""id":"a","#,
            r#""id":7,"#,
            r#""id":1.0,"#,
            r#""id":-9007199254740991,"#,
        ] {
            assert!(
                matches!(tool_call(&call(id, r#""t""#)), Ok(Some((_, "t")))),
                "{id}"
            );
        }
        for (id, name) in [
            (r#""id":1.5,"#, r#""t""#),
            (r#""id":9007199254740993,"#, r#""t""#),
            (r#""id":null,"#, r#""t""#),
            (r#""id":[1],"#, r#""t""#),
            ("", r#""t""#),
            (r#""id":2,"#, "3"),
        ] {
            let refused = tool_call(&call(id, name)).unwrap_err();
            assert_eq!(refused["error"]["code"], -32600, "{id} {name}: {refused}");
        }
        assert_eq!(tool_call(&call(r#""id":2,"#, "3")).unwrap_err()["id"], 2);
        let long = format!("\"{}\"", "t".repeat(65));
        for name in [long.as_str(), r#""""#, r#""pre\u0000mium""#] {
            let refused = tool_call(&call(r#""id":3,"#, name)).unwrap_err();
            assert_eq!(refused["error"]["code"], -32600, "{name}: {refused}");
        }
        assert!(matches!(
            tool_call(&json!({"id":1,"method":"tools/list"})),
            Ok(None)
        ));
    }
}
