//! Shared OAuth pieces.
