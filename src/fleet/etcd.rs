//! The connection to etcd: endpoints, credentials and CA from `[fleet]`, every
//! request bounded.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Certificate, Client, ConnectOptions, TlsOptions};

use crate::config::FleetConfig;

pub async fn connect(config: &FleetConfig) -> anyhow::Result<Client> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(super::REQUEST_TIMEOUT)
        // A dead etcd is noticed within seconds, not at the next TCP timeout.
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    if let (Some(user), Some(password)) = (&config.etcd_user, &config.etcd_password) {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(ca) = &config.etcd_ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read [fleet] etcd_ca {}", ca.display()))?;
        options = options.with_tls(TlsOptions::new().ca_certificate(Certificate::from_pem(pem)));
    }
    let connect = Client::connect(config.etcd.clone(), Some(options));
    let client = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| anyhow::anyhow!("etcd at {} did not answer within 3s", config.etcd.join(",")))?
        .map_err(|e| anyhow::anyhow!("{}", unreachable(config, &e)))?;
    Ok(client)
}

/// "etcd is unreachable", naming the endpoints.
pub fn unreachable(config: &FleetConfig, e: &etcd_client::Error) -> String {
    format!("etcd at {} is unreachable: {e}", config.etcd.join(","))
}
