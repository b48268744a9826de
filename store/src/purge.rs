//! The purge task: removes expired tokens on the configured interval.
