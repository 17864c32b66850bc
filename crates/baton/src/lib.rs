//! Baton: distributed coordination for Rust services.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::panic))]

pub mod error;
pub mod store;
mod client;

pub use client::{Client, ClientBuilder, DEFAULT_DIAL_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use error::{Error, Result};
