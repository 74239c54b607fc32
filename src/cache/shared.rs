//! One cache per process and etcd identity: the clients of a process that
//! use the same endpoints, credentials, TLS files, signing keys and
//! namespace share its informers (one list and one cached copy of each
//! engine's records, one watch stream). It lives while a client uses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::informer::Informer;
use super::watch::{self, Ctx, Informers};
use super::RankId;
use crate::config::Config;
use crate::keys;
use crate::session::Conn;
use crate::sign::Signer;

pub(crate) struct Shared {
    ctx: Ctx,
    informers: Arc<Informers>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What makes two clients' reads the same: the process (a forked child
/// starts its own), where they read, and as whom. Hashed, so that no
/// password is kept in the key.
fn identity(cfg: &Config) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    put(&std::process::id().to_le_bytes());
    put(cfg.namespace.as_bytes());
    put(cfg.endpoints.join(",").as_bytes());
    put(cfg.username.as_deref().unwrap_or("").as_bytes());
    put(cfg.password.as_ref().map_or(&b""[..], |p| p.expose()));
    for path in [
        &cfg.ca_cert,
        &cfg.cert,
        &cfg.key,
        &cfg.hmac_key_file,
        &cfg.hmac_previous_key_file,
    ] {
        put(path
            .as_deref()
            .map_or(&b""[..], |p| p.as_os_str().as_encoded_bytes()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The process's shared cache for `conn`'s identity, created (with `conn`
/// and `signer`) if no client of the process holds one. Must run on the
/// runtime.
pub(crate) fn for_client(conn: &Conn, signer: Option<Arc<Signer>>) -> Arc<Shared> {
    static ALL: Mutex<Option<HashMap<String, Weak<Shared>>>> = Mutex::new(None);
    let key = identity(conn.cfg());
    let mut all = ALL.lock().unwrap_or_else(|e| e.into_inner());
    let all = all.get_or_insert_with(HashMap::new);
    all.retain(|_, w| w.strong_count() > 0);
    if let Some(shared) = all.get(&key).and_then(Weak::upgrade) {
        return shared;
    }
    let (ctx, asked) = Ctx::new(conn.clone(), signer);
    let informers: Arc<Informers> = Arc::default();
    let idle = conn.cfg().cache_idle;
    let task = tokio::spawn(watch::run(
        ctx.clone(),
        asked,
        Arc::downgrade(&informers),
        idle,
    ));
    let shared = Arc::new(Shared {
        ctx,
        informers,
        task,
    });
    all.insert(key, Arc::downgrade(&shared));
    shared
}

impl Shared {
    fn namespace(&self) -> &str {
        &self.ctx.conn.cfg().namespace
    }

    /// The informer that covers `engine` (`None`: the whole namespace): an
    /// existing namespace-wide one unless `exact`, else the engine's own,
    /// new: listed in the background, then watched.
    pub fn informer(&self, engine: Option<&str>, exact: bool) -> Arc<Informer> {
        let (inf, new) = self.find_or_add(engine, exact);
        if new {
            self.ctx.relist(Arc::downgrade(&inf), Duration::ZERO);
        }
        inf
    }

    /// Same as [`Shared::informer`], a new informer listed in this future;
    /// true if it was (its records are as of now).
    pub async fn informer_listed(
        &self,
        engine: Option<&str>,
        exact: bool,
    ) -> (Arc<Informer>, bool) {
        let (inf, new) = self.find_or_add(engine, exact);
        let listed_now = new && self.ctx.list_first(&inf).await;
        (inf, listed_now)
    }

    /// The informer covering `engine`, and whether it was added now.
    fn find_or_add(&self, engine: Option<&str>, exact: bool) -> (Arc<Informer>, bool) {
        let ns_prefix = format!("{}/", self.namespace());
        let prefix = match engine {
            Some(e) => keys::engine_prefix(self.namespace(), e),
            None => ns_prefix.clone(),
        };
        let mut all = self.informers.lock().unwrap_or_else(|e| e.into_inner());
        let found = all
            .get(&prefix)
            .or_else(|| (!exact).then(|| all.get(&ns_prefix)).flatten());
        if let Some(inf) = found {
            inf.touch();
            return (inf.clone(), false);
        }
        let inf = Arc::new(Informer::new(prefix.clone()));
        all.insert(prefix, inf.clone());
        (inf, true)
    }

    /// The informer that covers `engine`, if one was started.
    pub fn covering(&self, engine: &str) -> Option<Arc<Informer>> {
        let all = self.informers.lock().unwrap_or_else(|e| e.into_inner());
        all.get(&keys::engine_prefix(self.namespace(), engine))
            .or_else(|| all.get(&format!("{}/", self.namespace())))
            .cloned()
    }

    /// Applies a client's own write to every informer that covers `key`, so
    /// that the process reads its own writes at once.
    pub fn write_through(&self, key: &str, id: RankId, slot: Option<super::Slot>, revision: i64) {
        let covering: Vec<_> = self
            .informers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|i| i.covers(key))
            .cloned()
            .collect();
        for inf in covering {
            inf.apply(id.clone(), slot.clone(), revision);
        }
    }

    /// Engines (or whole namespaces) cached and the records held, for
    /// benchmarks and capacity planning.
    pub fn footprint(&self) -> (usize, usize) {
        let all = self.informers.lock().unwrap_or_else(|e| e.into_inner());
        (all.len(), all.values().map(|i| i.len()).sum())
    }
}
