//! Reading ClickHouse's TabSeparated answers into analytics rows.
//!
//! Text rather than RowBinary: it reads the same from every server version (no exact-type
//! matching), and the tests read chDB's answers with this same code.

use crate::error::StoreError;
use schemas::analytics::{SessionUsage, UsageFigures};

/// The fields of one answer row, read left to right.
pub struct Fields<'a> {
    fields: std::str::Split<'a, char>,
    context: &'static str,
}

/// The rows of a TabSeparated answer.
pub fn rows<'a>(text: &'a str, context: &'static str) -> impl Iterator<Item = Fields<'a>> + 'a {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(move |line| Fields {
            fields: line.split('\t'),
            context,
        })
}

impl<'a> Fields<'a> {
    fn raw(&mut self) -> Result<&'a str, StoreError> {
        self.fields.next().ok_or(StoreError::BadAnswer {
            context: self.context,
            detail: "a row has too few columns".into(),
        })
    }

    pub fn string(&mut self) -> Result<String, StoreError> {
        Ok(unescape(self.raw()?))
    }

    pub fn int(&mut self) -> Result<i64, StoreError> {
        let raw = self.raw()?;
        let context = self.context;
        raw.parse().map_err(|_| StoreError::BadAnswer {
            context,
            detail: format!("`{raw}` is not an integer"),
        })
    }

    /// The eight columns of `UsageFigures`, in its order.
    pub fn figures(&mut self) -> Result<UsageFigures, StoreError> {
        Ok(UsageFigures {
            calls: self.int()?,
            errors: self.int()?,
            revenue_micros: self.int()?,
            cogs_micros: self.int()?,
            input_tokens: self.int()?,
            output_tokens: self.int()?,
            duration_ms_sum: self.int()?,
            duration_ms_max: self.int()?,
        })
    }

    /// The columns of `queries::sessions` and `queries::session`.
    pub fn session(&mut self) -> Result<SessionUsage, StoreError> {
        Ok(SessionUsage {
            session_id: self.string()?,
            agent_id: self.string()?,
            first_seen: self.int()?,
            last_seen: self.int()?,
            ended: self.int()? != 0,
            tools: self.int()?,
            figures: self.figures()?,
        })
    }
}

/// Undoes TabSeparated escaping (`\t`, `\n`, `\\` and the rest).
fn unescape(raw: &str) -> String {
    if !raw.contains('\\') {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_fields_read_in_order_with_escapes_undone() {
        let text = "a\\tb\t7\nit\\'s \\\\ here\t-3\n";
        let mut rows = rows(text, "test");
        let mut first = rows.next().unwrap();
        assert_eq!(first.string().unwrap(), "a\tb");
        assert_eq!(first.int().unwrap(), 7);
        let mut second = rows.next().unwrap();
        assert_eq!(second.string().unwrap(), "it's \\ here");
        assert_eq!(second.int().unwrap(), -3);
        assert!(rows.next().is_none());
    }

    #[test]
    fn short_or_malformed_rows_are_errors_not_zeroes() {
        let mut row = rows("x", "test").next().unwrap();
        row.string().unwrap();
        assert!(row.int().is_err());
        assert!(rows("1.5", "test").next().unwrap().int().is_err());
    }
}
