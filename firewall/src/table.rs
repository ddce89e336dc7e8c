//! [`TABLE`]: the name of the one nft table this crate owns.
//!
//! A leaf module (it imports nothing of the crate) so that the model, the error type and the
//! drift report can all name the table without importing one another.

/// Name of our table (family `inet`). The driver never touches any other table.
pub const TABLE: &str = "debvisor";
