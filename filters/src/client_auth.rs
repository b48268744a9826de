//! Client authentication.
