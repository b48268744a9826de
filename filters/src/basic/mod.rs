//! The general-purpose filters that real policies need around the OAuth ones.

pub mod compare_attribute;
pub mod set_attribute;
pub mod set_header;
pub mod set_response;
