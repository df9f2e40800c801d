//! The documentation's examples are real: the README's config parses and validates, and the
//! demo plan prices the seed event as the README says.

use schemas::config::Config;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn the_readme_config_example_is_valid() {
    let text = readme();
    let start = text.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let block = &text[start..start + text[start..].find("```").unwrap()];
    let config = Config::from_toml(block).unwrap();
    config.validate().unwrap();
    let web = &config.tenants[0].rate_plans[0].tools["web_search"];
    assert_eq!(web.cost.per_second.scaled(), 250_000);
}

#[test]
fn the_readme_starts_with_the_two_commands() {
    let text = readme();
    let first_block = &text[text.find("```sh").unwrap()..];
    let first_block = &first_block[..first_block[3..].find("```").unwrap()];
    assert!(first_block.contains("cargo run --release -- serve"));
    assert!(first_block.contains("scripts/test"));
}
