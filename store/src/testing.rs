//! The contract suite every `TokenStore` must pass (placeholder).
