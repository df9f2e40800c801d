//! The environment overrides, named after the config tree itself: setting `field` of section
//! `[section]` is `MCP_METER_<SECTION>_<FIELD>`, a top-level setting `MCP_METER_<FIELD>`, both in
//! upper case. No table lists them: [`env_overrides`] reads the names and the kind of every value
//! from the `Deserialize` impls (serde hands a deserializer each struct's field names and asks each
//! field for the type it wants), so a field added to a section is overridable, listed by `--help`
//! and checked against the README without another line here.
//!
//! `listen` and `data_dir` are command-line flags with variables of their own
//! (`MCP_METER_LISTEN`, `MCP_METER_DATA_DIR`), read by the binary with `MCP_METER_CONFIG` and
//! `MCP_METER_DEMO_KEY`; `[[tenants]]` come from the file only; `MCP_METER_LOG` sets the log filter.

use super::{Config, ConfigError};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::sync::OnceLock;

/// Top-level settings whose variables the command line reads as flags.
const READ_AS_FLAGS: &[&str] = &["listen", "data_dir"];

/// One environment variable and the setting it overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvOverride {
    /// `MCP_METER_KAFKA_PARTITIONS`.
    pub var: String,
    /// `kafka.partitions`.
    pub setting: String,
    /// `kafka`, or `store` for a top-level setting.
    pub section: &'static str,
    /// `partitions`; none for a top-level setting.
    field: Option<&'static str>,
    kind: Kind,
    optional: bool,
}

/// What a setting's value is, as its Rust type asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Unsigned,
    Signed,
    Number,
    Text,
}

/// Every environment variable that overrides the file, in the order of the config tree.
pub fn env_overrides() -> &'static [EnvOverride] {
    static ALL: OnceLock<Vec<EnvOverride>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut root = None;
        Config::deserialize(Probe { shape: &mut root }).expect("the config tree can be probed");
        let Some(Shape::Table(fields)) = root else {
            unreachable!("Config is a struct")
        };
        let mut all = Vec::new();
        for (name, shape) in fields {
            match shape {
                Shape::Value { kind, optional } if !READ_AS_FLAGS.contains(&name) => {
                    all.push(EnvOverride::new(name, None, kind, optional))
                }
                Shape::Table(settings) => {
                    for (field, shape) in settings {
                        let Shape::Value { kind, optional } = shape else {
                            unreachable!("sections hold plain values, not tables or lists")
                        };
                        all.push(EnvOverride::new(name, Some(field), kind, optional));
                    }
                }
                Shape::Value { .. } | Shape::List => {}
            }
        }
        all
    })
}

impl EnvOverride {
    fn new(
        first: &'static str,
        field: Option<&'static str>,
        kind: Kind,
        optional: bool,
    ) -> EnvOverride {
        let setting = match field {
            Some(field) => format!("{first}.{field}"),
            None => first.to_string(),
        };
        EnvOverride {
            var: format!(
                "MCP_METER_{}",
                setting.replace('.', "_").to_ascii_uppercase()
            ),
            setting,
            section: first,
            field,
            kind,
            optional,
        }
    }

    /// `MCP_METER_KAFKA_PARTITIONS (overrides kafka.partitions)`, how a problem names it.
    pub fn describe(&self) -> String {
        format!("{} (overrides {})", self.var, self.setting)
    }

    /// The variable's text as the TOML value the setting takes; `None` unsets an optional
    /// setting (an empty value).
    fn value(&self, text: &str) -> Result<Option<toml::Value>, String> {
        let text = text.trim();
        if self.optional && text.is_empty() {
            return Ok(None);
        }
        let value = match self.kind {
            Kind::Bool => toml::Value::Boolean(
                text.parse()
                    .map_err(|_| format!("`{text}` is not true or false"))?,
            ),
            Kind::Unsigned => toml::Value::Integer(
                text.parse::<u64>()
                    .ok()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| format!("`{text}` is not a whole number of 0 or more"))?,
            ),
            Kind::Signed => toml::Value::Integer(
                text.parse()
                    .map_err(|_| format!("`{text}` is not a whole number"))?,
            ),
            Kind::Number => toml::Value::Float(
                text.parse()
                    .map_err(|_| format!("`{text}` is not a number"))?,
            ),
            Kind::Text => toml::Value::String(text.to_string()),
        };
        Ok(Some(value))
    }
}

/// Puts every override that `lookup` finds into the file's table, reporting every bad value at
/// once.
pub(super) fn apply(
    table: &mut toml::Table,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    for o in env_overrides() {
        let Some(text) = lookup(&o.var) else { continue };
        let value = match o.value(&text) {
            Ok(value) => value,
            Err(e) => {
                problems.push(format!("{}: {e}", o.describe()));
                continue;
            }
        };
        let (parent, key) = match o.field {
            None => (&mut *table, o.section),
            Some(field) => match table
                .entry(o.section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            {
                toml::Value::Table(section) => (section, field),
                _ => unreachable!("the file parsed as a Config, so a section is a table"),
            },
        };
        match value {
            Some(value) => parent.insert(key.to_string(), value),
            None => parent.remove(key),
        };
    }
    ConfigError::of(problems)
}

/// What the probe learnt about one value of the tree.
enum Shape {
    Value { kind: Kind, optional: bool },
    Table(Vec<(&'static str, Shape)>),
    List,
}

/// A deserializer that holds no data: it answers each request with a neutral value and notes
/// what was asked for, which for a derived `Deserialize` is the field's type.
struct Probe<'s> {
    shape: &'s mut Option<Shape>,
}

type ProbeError = de::value::Error;

impl Probe<'_> {
    fn value(self, kind: Kind) {
        let optional = matches!(self.shape, Some(Shape::Value { optional: true, .. }));
        *self.shape = Some(Shape::Value { kind, optional });
    }
}

macro_rules! probe_numbers {
    ($($method:ident => $kind:ident, $visit:ident($neutral:expr);)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
            self.value(Kind::$kind);
            visitor.$visit($neutral)
        })*
    };
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeError> {
        Err(de::Error::custom(
            "a config setting whose type the environment cannot set",
        ))
    }

    probe_numbers! {
        deserialize_bool => Bool, visit_bool(false);
        deserialize_u8 => Unsigned, visit_u8(0);
        deserialize_u16 => Unsigned, visit_u16(0);
        deserialize_u32 => Unsigned, visit_u32(0);
        deserialize_u64 => Unsigned, visit_u64(0);
        deserialize_i8 => Signed, visit_i8(0);
        deserialize_i16 => Signed, visit_i16(0);
        deserialize_i32 => Signed, visit_i32(0);
        deserialize_i64 => Signed, visit_i64(0);
        deserialize_f32 => Number, visit_f32(0.0);
        deserialize_f64 => Number, visit_f64(0.0);
        deserialize_str => Text, visit_str("");
        deserialize_string => Text, visit_str("");
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        *self.shape = Some(Shape::Value {
            kind: Kind::Text,
            optional: true,
        });
        visitor.visit_some(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.value(Kind::Text);
        visitor.visit_enum(variants[0].into_deserializer())
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        *self.shape = Some(Shape::List);
        visitor.visit_seq(de::value::SeqDeserializer::new(std::iter::empty::<()>()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        let mut probed = Fields {
            fields,
            next: 0,
            shapes: Vec::new(),
        };
        let value = visitor.visit_map(&mut probed)?;
        *self.shape = Some(Shape::Table(probed.shapes));
        Ok(value)
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char bytes byte_buf unit unit_struct newtype_struct tuple tuple_struct map
        identifier ignored_any
    }
}

/// Offers every field of a struct once, each probed in turn.
struct Fields {
    fields: &'static [&'static str],
    next: usize,
    shapes: Vec<(&'static str, Shape)>,
}

impl<'de> MapAccess<'de> for &mut Fields {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        match self.fields.get(self.next) {
            Some(name) => seed.deserialize(name.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        let name = self.fields[self.next];
        let mut shape = None;
        let value = seed.deserialize(Probe { shape: &mut shape })?;
        self.shapes
            .push((name, shape.expect("every field asks for a type")));
        self.next += 1;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_field_is_a_variable_named_after_it() {
        let find = |var: &str| env_overrides().iter().find(|o| o.var == var);
        let partitions = find("MCP_METER_KAFKA_PARTITIONS").unwrap();
        assert_eq!(
            (partitions.setting.as_str(), partitions.kind),
            ("kafka.partitions", Kind::Signed)
        );
        let raw_days = find("MCP_METER_RETENTION_RAW_DAYS").unwrap();
        assert_eq!((raw_days.kind, raw_days.optional), (Kind::Unsigned, true));
        assert_eq!(find("MCP_METER_STORE").unwrap().kind, Kind::Text);
        assert_eq!(
            find("MCP_METER_MARGIN_GUARD_ENABLED").unwrap().kind,
            Kind::Bool
        );
        assert!(
            find("MCP_METER_LISTEN").is_none(),
            "a flag, read by the binary"
        );
        assert!(env_overrides()
            .iter()
            .all(|o| !o.setting.starts_with("tenants")));
        // Every field of every section, nothing else: 6 ingest, 3 sqlite, 5 clickhouse,
        // 10 kafka, 6 aggregator, 3 redis, 3 margin_guard, 3 retention, 3 credits, 1 portal,
        // 3 http, 4 rate_limits, and `store`.
        assert_eq!(env_overrides().len(), 51);
    }

    #[test]
    fn values_are_typed_by_their_setting() {
        let lookup = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(v, _)| *v == var)
                    .map(|(_, value)| value.to_string())
            }
        };
        let c = Config::from_toml_and_env(
            "[kafka]\nlinger_ms = 5\n",
            lookup(&[
                ("MCP_METER_KAFKA_PARTITIONS", "8"),
                ("MCP_METER_CLICKHOUSE_PASSWORD", "1234"),
                ("MCP_METER_REDIS_URL", "redis://127.0.0.1:6379"),
                ("MCP_METER_STORE", "clickhouse"),
                ("MCP_METER_MARGIN_GUARD_ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.partitions, 8);
        assert_eq!(c.kafka.linger_ms, 5, "the file's other settings stay");
        assert_eq!(c.clickhouse.password, "1234");
        assert_eq!(c.redis.url.as_deref(), Some("redis://127.0.0.1:6379"));
        assert_eq!(c.store, crate::config::StoreKind::Clickhouse);
        assert!(!c.margin_guard.enabled);

        let err = Config::from_toml_and_env(
            "",
            lookup(&[
                ("MCP_METER_INGEST_MAX_BODY_BYTES", "-1"),
                ("MCP_METER_MARGIN_GUARD_ENABLED", "yes"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            err.problems,
            vec![
                "MCP_METER_INGEST_MAX_BODY_BYTES (overrides ingest.max_body_bytes): `-1` is not a whole number of 0 or more".to_string(),
                "MCP_METER_MARGIN_GUARD_ENABLED (overrides margin_guard.enabled): `yes` is not true or false".to_string(),
            ]
        );
        // A value of the right kind that the setting still refuses names its variable too.
        let err =
            Config::from_toml_and_env("", lookup(&[("MCP_METER_STORE", "postgres")])).unwrap_err();
        assert!(
            err.problems[0]
                .starts_with("MCP_METER_STORE (overrides store): unknown variant `postgres`"),
            "{err}"
        );
    }
}
