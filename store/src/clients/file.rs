//! The YAML-file client registry.
