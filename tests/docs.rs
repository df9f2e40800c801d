//! The documentation's examples are real: the README's config parses and validates, and the
//! demo plan prices the seed event as the README says.

use schemas::config::Config;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// Every ```toml block of the README.
fn toml_blocks(text: &str) -> Vec<&str> {
    text.split("```toml\n")
        .skip(1)
        .map(|rest| &rest[..rest.find("```").unwrap()])
        .collect()
}

#[test]
fn the_readme_config_examples_are_valid() {
    let text = readme();
    let blocks = toml_blocks(&text);
    let full = *blocks
        .iter()
        .find(|b| b.contains("listen = "))
        .expect("a full config example");
    let config = Config::from_toml(full).unwrap();
    config.validate().unwrap();
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
