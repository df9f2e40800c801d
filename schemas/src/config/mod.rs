//! The config tree: one TOML file, `MCP_METER_*` environment overrides, one [`Config::validate`].
//!
//! Precedence, lowest first: the defaults named beside each field, the file, the environment
//! ([`env_overrides`]), then command-line flags. Reading the file and the environment is the
//! binary's job; this module only parses text and applies values it is handed.
//!
//! - `mod.rs`: the root [`Config`], parsing and [`ConfigError`].
//! - [`sections`]: `[ingest]`, `[sqlite]`, `[clickhouse]`, `[kafka]`, `[aggregator]`, `[redis]`,
//!   `[margin_guard]`, `[retention]`, `[credits]`, `[portal]`, `[http]`, `[rate_limits]`.
//! - [`tenants`]: `[[tenants]]` with their keys, scopes, rate plans, limits and thresholds.
//! - [`env`]: the environment overrides, named after the sections and fields themselves.
//! - [`validate`]: one check per section, every problem reported at once.

pub mod env;
pub mod sections;
pub mod tenants;
pub mod validate;

pub use env::{env_overrides, EnvOverride};
pub use sections::{
    AggregatorConfig, ClickHouseConfig, CreditsConfig, HttpConfig, IngestConfig, KafkaConfig,
    MarginGuardConfig, PortalConfig, RateLimitsConfig, RedisConfig, RetentionConfig, SqliteConfig,
    StoreKind,
};
pub use tenants::{
    ApiKeyConfig, CustomerCapConfig, LimitConfig, LimitSubject, LimitWindow,
    MarginThresholdsConfig, RateLimitConfig, Scope, TenantConfig, MAX_LIMIT,
};
pub use validate::listen_addresses;

use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Directory for the embedded store (`mcp-meter.sqlite`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where `serve` keeps events and answers analytics from.
    #[serde(default)]
    pub store: StoreKind,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub sqlite: SqliteConfig,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub aggregator: AggregatorConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub margin_guard: MarginGuardConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub credits: CreditsConfig,
    #[serde(default)]
    pub portal: PortalConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// Every tenant, with its API keys and rate plans.
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

impl Config {
    /// Parses a config file. TOML parsing stops at the first syntax error, misspelt setting or
    /// wrong type, so that one comes alone, saying so; [`Config::validate`] then reports every
    /// remaining problem at once.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| {
            format!(
                "{}\n(parsing stops at the first error like this one: fix it and run again; once \
the file parses, every other problem is reported together)",
                e.to_string().trim_end()
            )
        })
    }

    /// The file's text (empty without a file) with the environment's overrides on top, every
    /// bad variable reported at once. The text must parse on its own: check it with
    /// [`Config::from_toml`] first, whose errors name the line.
    pub fn from_toml_and_env(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![e.to_string().trim_end().to_string()],
        })?;
        env::apply(&mut table, &lookup)?;
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let setting = e.path().to_string();
            let from = env_overrides()
                .iter()
                .find(|o| o.setting == setting && lookup(&o.var).is_some())
                .map_or(setting, EnvOverride::describe);
            ConfigError {
                problems: vec![format!("{from}: {}", e.inner())],
            }
        })
    }
}

/// Every problem found in a config, reported together.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    /// `Ok` when nothing was found.
    pub(crate) fn of(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the config has {} problem(s):", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

/// The default of the root and of every section is what an empty table gives: the defaults
/// named beside the fields.
macro_rules! default_of_an_empty_table {
    ($($t:ty),*) => {
        $(impl Default for $t {
            fn default() -> $t {
                toml::from_str("").expect("an empty table takes every default")
            }
        })*
    };
}

default_of_an_empty_table!(
    Config,
    IngestConfig,
    SqliteConfig,
    ClickHouseConfig,
    KafkaConfig,
    AggregatorConfig,
    RedisConfig,
    MarginGuardConfig,
    RetentionConfig,
    CreditsConfig,
    PortalConfig,
    HttpConfig,
    RateLimitsConfig,
    MarginThresholdsConfig
);
