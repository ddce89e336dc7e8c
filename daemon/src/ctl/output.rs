//! What the commands print: the `--output` choice, aligned tables and table cells.

use serde_json::Value;

/// Output format of the printing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl Output {
    /// What a command prints: the JSON document on one line with `--output json`, else
    /// `text` (one place for the choice every `run` of a command group makes).
    pub fn render(self, doc: &Value, text: String) -> String {
        match self {
            Output::Json => format!("{doc}\n"),
            Output::Table => text,
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < r.len() {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(&" ".repeat(w.saturating_sub(c.chars().count())));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A stored value as JSON, or as a string when it is not JSON (what `show` prints of a key
/// an operator may have written by hand).
pub(crate) fn json_or_string(v: &[u8]) -> Value {
    serde_json::from_slice(v).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(v).into()))
}

/// One table cell from a JSON value: `-` for null or empty, strings unquoted.
pub(crate) fn str_of(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
