//! Logging: tracing to journald (when started by systemd or configured) or readable stderr,
//! with a level filter that SIGHUP can reload.
//!
//! Events carry the object they are about as a field (`node=`, `vm=`, `network=`, `stage=`);
//! on journald those become journal fields (`journalctl -u debvisord NODE=hv1`) and are also
//! appended to the message text (see [`crate::journal`]).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LogTarget, LoggingConfig};

/// Handle to change the level filter at run time.
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
            LogFormat::Text => base.boxed(),
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
