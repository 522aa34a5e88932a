//! pgcutover: a PostgreSQL wire-protocol proxy that moves live sessions from one
//! database to another.
//!
//! The data path reads top to bottom: [`client`] (listener, TLS, authentication) →
//! [`session`] (the relay loop) → [`backend`] (connect and log in). The control plane
//! sits beside it.

pub mod auth;
pub mod config;
pub mod protocol;
