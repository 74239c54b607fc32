//! Direct etcd requests for what the library does not offer: raw range
//! listing, lease time-to-live, per-member status.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use etcd_client::{GetOptions, KeyValue, LeaseTimeToLiveOptions};
use nixl_etcd::Config;

use crate::fail::{etcd_error, is_transient, timed_out, CliError};

/// Largest response accepted for a listing (gRPC's default is 4 MiB; a
/// namespace of large records is more).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A runtime for the direct requests (the library's client runs its own).
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("cannot start the async runtime", e))
}

pub struct Etcd {
    pub client: etcd_client::Client,
    pub cfg: Config,
}

impl Etcd {
    pub fn endpoints(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    /// Connects to every endpoint of `cfg` (requests are balanced over them).
    pub async fn connect(cfg: &Config) -> Result<Etcd, CliError> {
        let client = connect_to(cfg, &cfg.endpoints, cfg.timeout).await?;
        Ok(Etcd {
            client,
            cfg: cfg.clone(),
        })
    }

    /// Runs `attempt` again while it fails with a transient error (a member
    /// down, an election), a few times per endpoint, within the timeout.
    async fn retry<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, CliError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let limit = self.cfg.timeout;
        let endpoints = self.endpoints();
        let run = async {
            let mut left = 4 * self.cfg.endpoints.len().max(1);
            loop {
                match attempt().await {
                    Ok(v) => return Ok(v),
                    Err(e) if is_transient(&e) && left > 1 => {
                        left -= 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(etcd_error(&e, what, &endpoints)),
                }
            }
        };
        match tokio::time::timeout(limit, run).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(what, limit, &endpoints)),
        }
    }

    /// Every key-value under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, CliError> {
        let resp = self
            .retry("the listing", || {
                let mut kv = self
                    .client
                    .kv_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES);
                let prefix = prefix.to_owned();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut kvs = resp.kvs().to_vec();
        kvs.sort_by(|a, b| a.key().cmp(b.key()));
        Ok(kvs)
    }

    /// One key-value, if present.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, CliError> {
        let resp = self
            .retry("the read", || {
                let mut kv = self
                    .client
                    .kv_client()
                    .max_decoding_message_size(MAX_RESPONSE_BYTES);
                let key = key.to_owned();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().cloned())
    }

    /// Seconds left on each lease (`None`: expired or revoked). Lease 0 (no
    /// lease) is not asked about.
    pub async fn lease_ttls(
        &self,
        ids: impl IntoIterator<Item = i64>,
    ) -> Result<HashMap<i64, Option<i64>>, CliError> {
        let mut out = HashMap::new();
        for id in ids {
            if id == 0 || out.contains_key(&id) {
                continue;
            }
            let ttl = self
                .retry("the lease time-to-live", || {
                    let mut leases = self.client.lease_client();
                    async move {
                        match leases
                            .time_to_live(id, Some(LeaseTimeToLiveOptions::new()))
                            .await
                        {
                            // -1: expired or revoked.
                            Ok(r) => Ok((r.ttl() >= 0).then_some(r.ttl())),
                            // Some versions answer a lease that is gone so.
                            Err(etcd_client::Error::GRpcStatus(s))
                                if s.code() == tonic::Code::NotFound =>
                            {
                                Ok(None)
                            }
                            Err(e) => Err(e),
                        }
                    }
                })
                .await?;
            out.insert(id, ttl);
        }
        Ok(out)
    }
}

/// A client for exactly `endpoints`, connected within `timeout`, with the
/// TLS and credentials of `cfg` (as the library connects).
pub async fn connect_to(
    cfg: &Config,
    endpoints: &[String],
    timeout: Duration,
) -> Result<etcd_client::Client, CliError> {
    let joined = endpoints.join(",");
    let opts = nixl_etcd::connect::ConnectOptions::from_config(cfg)
        .and_then(|o| o.etcd_options())
        .map_err(|e| CliError::new(crate::fail::EXIT_USAGE, e.message))?
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    match tokio::time::timeout(timeout, etcd_client::Client::connect(endpoints, Some(opts))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(etcd_error(&e, "the connection", &joined)),
        Err(_) => Err(CliError::new(
            crate::fail::EXIT_UNREACHABLE,
            format!(
                "ETCD connection failed: no answer from {joined} within {:.1} s; check that \
                 etcd is running and reachable, and VLLM_NIXL_ETCD_ENDPOINTS",
                timeout.as_secs_f64()
            ),
        )),
    }
}
