//! [`FirewallError`]: everything that can go wrong building, applying or reading the ruleset.

use std::fmt;
use std::time::Duration;

use crate::drift::Drift;
use crate::table::TABLE;

/// One problem found while validating the model (a field path and what is wrong with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `firewall.log_rate`, `networks[2].acls_in[0].ports`, `cluster_cidrs[1]`…
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// Which object of an apply batch nft refused, so an operator knows which rule to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The table commands themselves.
    Table,
    /// A chain definition.
    Chain {
        /// Chain name.
        chain: String,
    },
    /// A rule.
    Rule {
        /// Chain name.
        chain: String,
        /// Position in the chain (0-based).
        index: usize,
        /// The rule's description (its comment without the id).
        description: String,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Location::Table => write!(f, "table inet {TABLE}"),
            Location::Chain { chain } => write!(f, "chain {chain}"),
            Location::Rule {
                chain,
                index,
                description,
            } => write!(f, "rule {index} of chain {chain} ({description:?})"),
        }
    }
}

fn at(location: &Option<Location>) -> String {
    location
        .as_ref()
        .map(|l| format!(" at {l}"))
        .unwrap_or_default()
}

/// Errors of the firewall driver. nft's own message (its stderr) is always carried verbatim.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The model failed validation; nothing was sent to nft.
    #[error("invalid firewall ruleset: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
    /// The command could not be started (`nft` or `ip` missing, no permission…).
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The command did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// nft refused the batch; the transaction was not committed, the previous ruleset is intact.
    #[error("nft rejected the ruleset{}: {stderr}", at(.location))]
    Rejected {
        /// The object nft refused, when it could be found (see [`crate::Firewall::apply`] on [`crate::Nft`]).
        location: Option<Location>,
        /// nft's message.
        stderr: String,
    },
    /// Any other failing command (listing, `ip netns exec`…).
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its stderr.
        stderr: String,
    },
    /// nft's output could not be understood.
    #[error("cannot parse the output of `{command}`: {reason}")]
    Parse {
        /// The command line.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// The batch could not be serialized to JSON (a bug: the model's types always serialize).
    #[error("cannot render the ruleset to JSON: {0}")]
    Render(String),
    /// nft reported success but the table read back does not match the model.
    #[error("nft accepted the ruleset but reading it back differs: {0}")]
    NotApplied(Box<Drift>),
}
