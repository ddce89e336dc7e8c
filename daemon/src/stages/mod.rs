//! The startup stages, one file each (filled in by the next step).
