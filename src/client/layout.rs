//! NIXL's own key layout (`{ns}/{agent}/` and `{ns}/{agent}/{label}`), as
//! NIXL's built-in etcd exchange writes and reads it, under the client's lease.

use std::time::{Duration, Instant};

use super::{log_handshake, Client, Inner};
use crate::error::{Error, Result, Status};
use crate::etcd_error::{self, Op};
use crate::nixl_layout;

impl Client {
    /// Publishes `blob` exactly as NIXL's built-in etcd exchange does: the
    /// agent's marker `{ns}/{agent}/` (empty) and `{ns}/{agent}/{label}` (the
    /// raw blob), in one transaction, both under the client's lease. `ns` is
    /// the configured `nixl_namespace`, verbatim; `label` `None` or `""` means
    /// `"metadata"`. Publishing again replaces.
    pub fn publish_nixl(&self, agent_name: &str, label: Option<&str>, blob: &[u8]) -> Result<()> {
        nixl_layout::validate_agent_name(agent_name)?;
        let label = nixl_layout::resolve_label(label)?;
        let cfg = self.config();
        let ns = &cfg.nixl_namespace;
        let marker = nixl_layout::marker_key(ns, agent_name);
        let key = nixl_layout::nixl_key(ns, agent_name, label);
        if nixl_layout::overlaps_rank_records(&cfg.namespace, &marker) {
            return Err(Error::invalid(format!(
                "NIXL agent {agent_name} cannot be published under {marker}: that prefix holds \
                 the rank records of namespace {}, which unpublishing would delete; give \
                 nixl_namespace (or NIXL_ETCD_NAMESPACE) a value apart from it",
                cfg.namespace
            )));
        }
        nixl_layout::check_fits(
            cfg.max_request_bytes,
            agent_name,
            label,
            &key,
            &marker,
            blob.len(),
        )?;
        let kvs = vec![(key.clone(), blob.to_vec()), (marker.clone(), Vec::new())];
        let inner = self.inner.clone();
        self.call(Op::PublishNixl, cfg.timeout, async move {
            let mut st = inner.session.lock().await;
            st.put_attached(&kvs, Op::PublishNixl).await?;
            st.hold(kvs);
            Ok(())
        })?;
        log::info!("Registered NIXL agent with ETCD");
        log::debug!(
            "published NIXL agent {agent_name} label {label}: {} bytes at {key} (marker {marker})",
            blob.len()
        );
        Ok(())
    }

    /// The raw blob at `{ns}/{agent}/{label}`, as soon as it exists: a get,
    /// then a watch on that exact key from the revision after the get (no
    /// polling, no cache). `timeout` `None` means the configured timeout;
    /// zero means one get and no wait (`TIMEOUT` if the key is absent).
    pub fn fetch_nixl(
        &self,
        agent_name: &str,
        label: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        nixl_layout::validate_agent_name(agent_name)?;
        let label = nixl_layout::resolve_label(label)?;
        log::debug!("Discovering NIXL agent {agent_name} through ETCD");
        let started = Instant::now();
        let cfg = self.config();
        let key = nixl_layout::nixl_key(&cfg.nixl_namespace, agent_name, label);
        let limit = timeout.unwrap_or(cfg.timeout);
        let inner = self.inner.clone();
        let k = key.clone();
        // A zero timeout still gets its one read, bounded like any call.
        let (bound, wait) = match limit.is_zero() {
            true => (cfg.timeout, false),
            false => (limit, true),
        };
        let blob = self
            .call(Op::FetchNixl, bound, async move {
                fetch_raw(&inner, &k, wait).await
            })
            .map_err(|e| match e.status {
                Status::ErrTimeout => Error::new(
                    Status::ErrTimeout,
                    format!(
                        "Timeout waiting for NIXL agent {agent_name} (key {key}) after {:.1} s; \
                         check that it started and published, that both sides use the same \
                         etcd endpoints and NIXL namespace (open option nixl_namespace, else \
                         NIXL_ETCD_NAMESPACE; here {:?}), or pass a longer timeout_ms",
                        limit.as_secs_f64(),
                        cfg.nixl_namespace
                    ),
                ),
                _ => e,
            })?;
        log_handshake(started);
        Ok(blob)
    }

    /// Deletes the agent's whole prefix `{ns}/{agent}/` (marker and every
    /// label, in one etcd request, as NIXL's invalidate does) and forgets those
    /// keys. `NOT_FOUND` if this client did not publish the agent.
    pub fn unpublish_nixl(&self, agent_name: &str) -> Result<()> {
        nixl_layout::validate_agent_name(agent_name)?;
        let cfg = self.config();
        let marker = nixl_layout::marker_key(&cfg.nixl_namespace, agent_name);
        let inner = self.inner.clone();
        let (id, prefix) = (agent_name.to_owned(), marker.clone());
        self.call(Op::UnpublishNixl, cfg.timeout, async move {
            let session = &inner.session;
            let mut st = session.lock().await;
            if !st.holds(&prefix) {
                return Err(Error::new(
                    Status::ErrNotFound,
                    format!(
                        "NIXL agent {id} is not published by this client (no key {prefix}); \
                         only the client that published an agent can unpublish it"
                    ),
                ));
            }
            // One delete-range: the marker and every label go at one revision.
            let opts = etcd_client::DeleteOptions::new().with_prefix();
            let p = prefix.as_bytes();
            etcd_error::retry_transient(session.cfg(), || {
                let mut kv = session.etcd().kv_client();
                let opts = opts.clone();
                async move { kv.delete(p, Some(opts)).await }
            })
            .await
            .map_err(|e| etcd_error::map(e, Op::UnpublishNixl, session.cfg()))?;
            st.release_prefix(&prefix);
            Ok(())
        })?;
        log::debug!("unpublished NIXL agent {agent_name} (deleted prefix {marker})");
        Ok(())
    }
}

/// The value at `key` once it exists: a get, then (if `wait`) a watch on the
/// exact key from the get's revision + 1, so the watch is current in etcd (no
/// catch-up delay) and misses nothing written since the get. Without `wait`,
/// an absent key is a `TIMEOUT` at once.
async fn fetch_raw(inner: &Inner, key: &str, wait: bool) -> Result<Vec<u8>> {
    let session = &inner.session;
    let map = |e: etcd_client::Error| etcd_error::map(e, Op::FetchNixl, session.cfg());
    let resp = etcd_error::retry_transient(session.cfg(), || {
        let mut kv = session.etcd().kv_client();
        async move { kv.get(key, None).await }
    })
    .await
    .map_err(map)?;
    if let Some(kv) = resp.kvs().first() {
        return Ok(kv.value().to_vec());
    }
    if !wait {
        return Err(Error::new(Status::ErrTimeout, format!("{key} is absent")));
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let opts = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = etcd_error::retry_transient(session.cfg(), || {
        let mut watch = session.etcd().watch_client();
        let opts = opts.clone();
        async move { watch.watch(key, Some(opts)).await }
    })
    .await
    .map_err(map)?;
    loop {
        let Some(msg) = stream.message().await.map_err(map)? else {
            return Err(Error::new(
                Status::ErrConnection,
                format!("ETCD connection failed: the watch on {key} ended"),
            ));
        };
        if msg.canceled() {
            return Err(Error::new(
                Status::ErrConnection,
                format!("etcd cancelled the watch on {key}: {}", msg.cancel_reason()),
            ));
        }
        for ev in msg.events() {
            if let (etcd_client::EventType::Put, Some(kv)) = (ev.event_type(), ev.kv()) {
                return Ok(kv.value().to_vec());
            }
        }
    }
}
