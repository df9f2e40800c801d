//! ClickHouse's TabSeparated: reading answers into analytics rows, and writing the rows of an
//! INSERT.
//!
//! Text rather than RowBinary: it reads and writes the same on every server version (no
//! exact-type matching), and on chDB, which the tests run through the same code.

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

/// Appends `text` escaped as one TabSeparated field, then the tab that ends it.
pub fn push_field(out: &mut String, text: &str) {
    push_escaped(out, text);
    out.push('\t');
}

/// Appends `text` with the characters TabSeparated gives a meaning escaped: the separators
/// (tab, newline), the escape character itself, and the ones `unescape` reads back.
pub fn push_escaped(out: &mut String, text: &str) {
    let special = |c: char| matches!(c, '\t' | '\n' | '\r' | '\\' | '\0' | '\u{8}' | '\u{c}');
    if !text.contains(special) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c => out.push(c),
        }
    }
}

/// Appends a `DateTime('UTC')` field, `YYYY-MM-DD hh:mm:ss`, then a tab: the one text form
/// every server version reads (a column in UTC reads it in UTC, whatever the server's zone).
pub fn push_date_time(out: &mut String, epoch_seconds: i64) {
    use chrono::{Datelike, Timelike};
    let at = chrono::DateTime::from_timestamp(epoch_seconds, 0).unwrap_or_default();
    let _ = std::fmt::Write::write_fmt(
        out,
        format_args!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}\t",
            at.year(),
            at.month(),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ),
    );
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
    fn written_fields_read_back_as_they_were() {
        let odd = "tab\there\nnew line \\ back\r\0\u{8}\u{c} ünïcode";
        let mut out = String::new();
        push_field(&mut out, odd);
        push_date_time(&mut out, 1_795_181_530);
        push_escaped(&mut out, "plain");
        assert_eq!(out.matches('\t').count(), 2, "{out}");
        assert!(!out.contains('\n'));
        let mut row = rows(&out, "test").next().unwrap();
        assert_eq!(row.string().unwrap(), odd);
        assert_eq!(row.string().unwrap(), "2026-11-20 13:32:10");
        assert_eq!(row.string().unwrap(), "plain");
    }

    #[test]
    fn short_or_malformed_rows_are_errors_not_zeroes() {
        let mut row = rows("x", "test").next().unwrap();
        row.string().unwrap();
        assert!(row.int().is_err());
        assert!(rows("1.5", "test").next().unwrap().int().is_err());
    }
}
