//! pgcutover: a PostgreSQL wire-protocol proxy that moves live sessions from one
//! database to another.
//!
//! The data path reads top to bottom: [`client`] (listener, TLS, authentication) →
//! [`session`] (the relay loop) → [`backend`] (connect and log in). The control plane
//! sits beside it and talks to the data path through [`server::Proxy`].

pub mod admin;
pub mod auth;
pub mod cli;
pub mod demo;
pub mod etcd_server;
pub mod fleet;
pub mod gate;
pub mod loadtest;
pub mod metrics;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod config;
pub mod cutover;
pub mod net;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shards;
pub mod state;
pub mod tls;
