//! A tracing layer that writes to journald's native socket with the event's fields twice:
//! as journal fields (`journalctl -u debvisord VM=web1`) and appended to the message text, so
//! plain `journalctl -u debvisord` already reads `stage complete stage=store-connection
//! outcome=ok duration_ms=3` instead of a bare "stage complete".
//!
//! Values come from outside (network ids, VM names, reasons, errors): control characters
//! (newline, carriage return, tab, ESC, …) are escaped in the message text and in every
//! field, so a key name cannot forge a log line or colour a terminal. The stderr text format
//! uses the same rules ([`text_pair`], [`escape_control`]).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;

/// journald's native protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Longest message text sent; a larger one is cut (journald refuses huge datagrams).
const MAX_MESSAGE: usize = 48 * 1024;

/// The journald layer.
pub struct JournalLayer {
    socket: UnixDatagram,
    identifier: String,
}

impl JournalLayer {
    /// Connect to journald at `path`; fails when no journald listens there.
    pub fn connect(path: &Path, identifier: &str) -> std::io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(JournalLayer {
            socket,
            identifier: identifier.to_string(),
        })
    }
}

/// Collects an event's message and fields.
#[derive(Default)]
pub(crate) struct Fields {
    pub(crate) message: String,
    pub(crate) fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let v = format!("{value:?}");
        if field.name() == "message" {
            self.message = v;
        } else {
            self.fields.push((field.name().to_string(), v));
        }
    }
}

fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        Level::DEBUG | Level::TRACE => "7",
    }
}

/// A journal field name from a tracing field name: upper case, `[A-Z0-9_]`, no leading `_`.
fn field_name(name: &str) -> String {
    let mut n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    while n.starts_with('_') || n.starts_with(|c: char| c.is_ascii_digit()) {
        n.remove(0);
    }
    if n.is_empty() {
        n.push_str("FIELD");
    }
    n
}

/// `s` with every control character escaped (`\n`, `\r`, `\t`, `\u{1b}`, …), so that it
/// stays on one line and cannot drive a terminal; borrowed when there is none.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// ` key=value` for the message text: values with spaces, quotes or control characters are
/// quoted with those escaped (`vm="a\nb"`), others are written as they are.
pub fn text_pair(out: &mut String, k: &str, v: &str) {
    if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '"' || c.is_control()) {
        let _ = write!(out, " {k}={v:?}");
    } else {
        let _ = write!(out, " {k}={v}");
    }
}

fn push_field(buf: &mut Vec<u8>, name: &str, value: &str) {
    if value.contains('\n') {
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    } else {
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'\n');
    }
}

/// One native-protocol datagram for an event.
pub fn encode(
    identifier: &str,
    level: &Level,
    target: &str,
    message: &str,
    fields: &[(String, String)],
) -> Vec<u8> {
    let mut text = escape_control(message).into_owned();
    for (k, v) in fields {
        text_pair(&mut text, k, v);
    }
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(" …");
    }
    let mut buf = Vec::with_capacity(text.len() * 2 + 128);
    push_field(&mut buf, "MESSAGE", &text);
    push_field(&mut buf, "PRIORITY", priority(level));
    push_field(&mut buf, "SYSLOG_IDENTIFIER", identifier);
    push_field(&mut buf, "TARGET", target);
    for (k, v) in fields {
        let name = field_name(k);
        if matches!(
            name.as_str(),
            "MESSAGE" | "PRIORITY" | "SYSLOG_IDENTIFIER" | "TARGET"
        ) {
            continue;
        }
        push_field(&mut buf, &name, &escape_control(v));
    }
    buf
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let meta = event.metadata();
        let buf = encode(
            &self.identifier,
            meta.level(),
            meta.target(),
            &f.message,
            &f.fields,
        );
        // Logging must never take the daemon down: a lost line is all that can happen.
        let _ = self.socket.send(&buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn fields_are_journal_fields_and_part_of_the_message() {
        let buf = encode(
            "debvisord",
            &Level::WARN,
            "debvisor_daemon::reactors::domain",
            "vm state changed",
            &pairs(&[
                ("vm", "web1"),
                ("reason", "guest ignored ACPI"),
                ("to", "stopped"),
            ]),
        );
        let s = String::from_utf8(buf).expect("utf8");
        assert!(
            s.contains(
                "MESSAGE=vm state changed vm=web1 reason=\"guest ignored ACPI\" to=stopped\n"
            ),
            "{s}"
        );
        assert!(s.contains("\nPRIORITY=4\n"), "{s}");
        assert!(s.contains("\nSYSLOG_IDENTIFIER=debvisord\n"), "{s}");
        assert!(s.contains("\nVM=web1\n"), "{s}");
        assert!(s.contains("\nREASON=guest ignored ACPI\n"), "{s}");
    }

    #[test]
    fn multi_line_values_use_the_length_prefixed_form() {
        let mut buf = Vec::new();
        push_field(&mut buf, "ERROR", "a\nb");
        let want: Vec<u8> = [b"ERROR\n".as_slice(), &3u64.to_le_bytes(), b"a\nb\n"].concat();
        assert_eq!(buf, want);
    }

    #[test]
    fn control_characters_cannot_forge_lines_or_drive_a_terminal() {
        let evil = "7\nFORGED level=ERROR \u{1b}[31mred\r\t";
        let buf = encode(
            "d",
            &Level::WARN,
            "t",
            "ignored \u{1b}[2J",
            &pairs(&[("network", evil), ("vm", "web\u{7}")]),
        );
        assert!(!buf.contains(&0x1b) && !buf.contains(&0x07) && !buf.contains(&b'\r'));
        let s = String::from_utf8(buf).expect("utf8");
        // Every field is one `NAME=value` line: no length-prefixed (multi-line) value.
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 6, "{s:?}");
        assert!(lines.iter().all(|l| l.contains('=')), "{s:?}");
        assert_eq!(
            lines[0],
            "MESSAGE=ignored \\u{1b}[2J network=\"7\\nFORGED level=ERROR \\u{1b}[31mred\\r\\t\" vm=\"web\\u{7}\""
        );
        assert!(
            s.contains("\nNETWORK=7\\nFORGED level=ERROR \\u{1b}[31mred\\r\\t\n"),
            "{s:?}"
        );
        assert_eq!(escape_control("plain"), Cow::Borrowed("plain"));
    }

    #[test]
    fn field_names_are_sanitised() {
        assert_eq!(field_name("vm"), "VM");
        assert_eq!(field_name("restart_in_ms"), "RESTART_IN_MS");
        assert_eq!(field_name("_x.y"), "X_Y");
        assert_eq!(field_name("9a"), "A");
        assert_eq!(field_name("__"), "FIELD");
    }

    #[test]
    fn huge_messages_are_cut() {
        let long = "x".repeat(MAX_MESSAGE * 2);
        let buf = encode("d", &Level::INFO, "t", &long, &[]);
        assert!(buf.len() < MAX_MESSAGE + 1024);
    }
}
