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

/// Left-aligned columns separated by two spaces, fitted to the terminal's width when
/// printing to one (see [`terminal_width`]).
pub fn table(rows: &[Vec<String>]) -> String {
    match terminal_width() {
        Some(w) => fit_table(rows, w),
        None => plain_table(rows),
    }
}

/// Left-aligned columns separated by two spaces, as wide as their widest cell.
pub fn plain_table(rows: &[Vec<String>]) -> String {
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

/// The width tables are fitted to: `COLUMNS` when set, else the terminal's width when
/// stdout is a terminal; `None` (no fitting) when output goes to a pipe or file.
pub fn terminal_width() -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|c| *c > 0)
    {
        return Some(c);
    }
    // SAFETY: isatty and ioctl(TIOCGWINSZ) only read the descriptor's state into `ws`, a
    // plain struct owned here.
    unsafe {
        if libc::isatty(1) != 1 {
            return None;
        }
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return Some(usize::from(ws.ws_col));
        }
    }
    None
}

/// Cut `s` to `w` characters, ending in `…` when cut.
pub fn ellipsize(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(w - 1).collect();
    out.push('…');
    out
}

/// A table fitted to `width`: the widest columns are narrowed (cells cut with `…`), never
/// below 6 characters, until a line fits; the header row is never cut.
pub fn fit_table(rows: &[Vec<String>], width: usize) -> String {
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths: Vec<usize> = (0..ncol)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let header: Vec<usize> = rows
        .first()
        .map(|r| r.iter().map(|c| c.chars().count()).collect())
        .unwrap_or_default();
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while total(&widths) > width {
        let floor = |i: usize| header.get(i).copied().unwrap_or(0).max(6);
        let Some((i, _)) = widths
            .iter()
            .enumerate()
            .filter(|(i, w)| **w > floor(*i))
            .max_by_key(|(i, w)| (**w, *i))
        else {
            break;
        };
        let excess = total(&widths) - width;
        widths[i] = (widths[i] - excess).max(floor(i)).min(widths[i] - 1);
    }
    let cut: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(i, c)| ellipsize(c, widths.get(i).copied().unwrap_or(usize::MAX)))
                .collect()
        })
        .collect();
    plain_table(&cut)
}

/// Memory or sizes given in MiB, as a person reads them (`512 MiB`, `3.1 GiB`).
pub fn mib(m: u64) -> String {
    if m >= 1024 * 1024 {
        format!("{:.1} TiB", m as f64 / (1024.0 * 1024.0))
    } else if m >= 1024 {
        format!("{:.1} GiB", m as f64 / 1024.0)
    } else {
        format!("{m} MiB")
    }
}

/// A byte count as a person reads it (`12.0 MiB`).
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration as a person reads it: `3d 4h`, `2h 5m`, `4m 10s`, `12.3s`, `450ms`.
pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d {}h", s / 86_400, (s % 86_400) / 3600)
    } else if s >= 3600 {
        format!("{}h {}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {}s", s / 60, s % 60)
    } else if s >= 1 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// How long ago an RFC 3339 time was (`5s ago`), `None` when it does not parse.
pub fn ago(rfc3339: &str) -> Option<String> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    let d = time::OffsetDateTime::now_utc() - t;
    let secs = d.as_seconds_f64().max(0.0);
    Some(format!(
        "{} ago",
        human_duration(std::time::Duration::from_secs(secs as u64))
    ))
}

/// `key  value` lines, keys padded to one width (the human `show` views).
pub fn fields(rows: &[(String, String)], indent: usize) -> String {
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (k, v) in rows {
        let mut lines = v.lines();
        let first = lines.next().unwrap_or("");
        out.push_str(format!("{pad}{k:<w$}  {first}").trim_end());
        out.push('\n');
        for more in lines {
            out.push_str(&format!("{pad}{:w$}  {more}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_the_width() {
        let rows = vec![
            vec!["NAME".to_string(), "PROBLEM".to_string()],
            vec!["web".to_string(), "x".repeat(80)],
        ];
        let out = fit_table(&rows, 40);
        for l in out.lines() {
            assert!(l.chars().count() <= 40, "{l:?}");
        }
        assert!(out.contains('…'));
        assert!(out.starts_with("NAME  PROBLEM"));
        // Wide enough: unchanged.
        assert_eq!(fit_table(&rows, 200), plain_table(&rows));
    }

    #[test]
    fn human_units() {
        assert_eq!(mib(512), "512 MiB");
        assert_eq!(mib(3174), "3.1 GiB");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(12 * 1024 * 1024), "12.0 MiB");
        assert_eq!(
            human_duration(std::time::Duration::from_millis(450)),
            "450ms"
        );
        assert_eq!(
            human_duration(std::time::Duration::from_secs(250)),
            "4m 10s"
        );
        assert_eq!(
            human_duration(std::time::Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 4h"
        );
        assert_eq!(ellipsize("abcdef", 4), "abc…");
        assert_eq!(
            fields(
                &[("a".into(), "1".into()), ("long".into(), "x\ny".into())],
                2
            ),
            "  a     1\n  long  x\n        y\n"
        );
    }
}
