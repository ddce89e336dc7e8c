//! Logging: tracing to journald (when started by systemd or configured) or readable stderr,
//! with a level filter that SIGHUP can reload.
//!
//! Events carry the object they are about as a field (`node=`, `vm=`, `network=`, `stage=`);
//! on journald those become journal fields (`journalctl -u debvisord NODE=hv1`) and are also
//! appended to the message text (see [`crate::journal`]). Both the journal and the stderr
//! text format escape control characters in the message and every field value, so a name
//! from etcd cannot forge a log line; the JSON format escapes them by itself.

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogTarget, LoggingConfig};

/// Handle to change the level filter at run time.
#[derive(Clone)]
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, Registry>,
    /// Where lines go, for the startup log line.
    pub target: &'static str,
}

/// The filter in effect: `RUST_LOG` when set, else the configured level.
pub fn filter_for(level: &str) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            EnvFilter::try_new(v).map_err(|e| format!("RUST_LOG: {e}"))
        }
        _ => EnvFilter::try_new(level).map_err(|e| format!("logging.level: {e}")),
    }
}

/// Install the global subscriber. Fails only when the level cannot be parsed; a missing
/// journald falls back to stderr with a warning line.
pub fn init(cfg: &LoggingConfig) -> Result<LogHandle, String> {
    let (filter, reload) = reload::Layer::new(filter_for(&cfg.level)?);
    let want_journald = match cfg.target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    let mut fallback_note = None;
    let journald = if want_journald {
        match crate::journal::JournalLayer::connect(
            std::path::Path::new(crate::journal::JOURNAL_SOCKET),
            "debvisord",
        ) {
            Ok(l) => Some(l),
            Err(e) => {
                fallback_note = Some(format!("journald unavailable ({e}); logging to stderr"));
                None
            }
        }
    } else {
        None
    };
    let stderr_layer = if journald.is_none() {
        let base = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(false);
        Some(match cfg.format {
            LogFormat::Json => base
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .boxed(),
            LogFormat::Text => base.fmt_fields(EscapedFields).boxed(),
        })
    } else {
        None
    };
    let target = if journald.is_some() {
        "journald"
    } else {
        "stderr"
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr_layer)
        .try_init()
        .map_err(|e| format!("cannot install logger: {e}"))?;
    if let Some(note) = fallback_note {
        tracing::warn!("{note}");
    }
    Ok(LogHandle { reload, target })
}

impl LogHandle {
    /// Replace the level filter (SIGHUP).
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let f = filter_for(level)?;
        self.reload
            .reload(f)
            .map_err(|e| format!("cannot reload log filter: {e}"))
    }
}

/// Field formatter of the stderr text format: the message, then ` key=value` per field, with
/// control characters escaped and values quoted like the journal's message text
/// ([`crate::journal::text_pair`]). tracing's default formatter writes `%` values raw, so a
/// network id holding a newline would start a forged line.
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut f = crate::journal::Fields::default();
        fields.record(&mut f);
        let mut out = crate::journal::escape_control(&f.message).into_owned();
        for (k, v) in &f.fields {
            crate::journal::text_pair(&mut out, k, v);
        }
        writer.write_str(out.trim_start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_text_format_escapes_control_characters_in_every_field() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || w.clone())
                .with_ansi(false)
                .with_target(false)
                .fmt_fields(EscapedFields),
        );
        let id = "7\nFORGED level=ERROR \u{1b}[31mred";
        tracing::subscriber::with_default(sub, || {
            tracing::warn!(network = %id, reason = ?"a\tb", n = 3, "ignored \u{1b}[2J");
        });
        let out = String::from_utf8(buf.0.lock().expect("buf").clone()).expect("utf8");
        assert_eq!(out.lines().count(), 1, "{out:?}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(
            out.contains(
                "ignored \\u{1b}[2J network=\"7\\nFORGED level=ERROR \\u{1b}[31mred\" reason=\"\\\"a\\\\tb\\\"\" n=3"
            ),
            "{out:?}"
        );
    }
}
