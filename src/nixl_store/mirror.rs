//! A live copy of every key under one etcd prefix: a paged list, then one
//! long-lived watch from the list's revision + 1 (current in etcd, so a put
//! reaches the copy in about a millisecond). Re-listed after any watch
//! failure; while etcd is away, reads are answered from the last copy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::etcd_error;
use crate::session::{self, Session};

pub struct Mirror {
    pub prefix: String,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    kv: HashMap<String, Vec<u8>>,
    /// Listed at least once: the copy is the truth (or was, before an outage).
    listed: bool,
    /// The watch is running now.
    live: bool,
}

impl Mirror {
    pub fn new(prefix: String) -> Arc<Mirror> {
        Arc::new(Mirror {
            prefix,
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// `None`: never listed yet (ask etcd); `Some(None)`: absent.
    pub fn get(&self, key: &str) -> Option<Option<Vec<u8>>> {
        let st = self.lock();
        st.listed.then(|| st.kv.get(key).cloned())
    }

    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies this store's own write at once (its watch event follows).
    pub fn put_local(&self, key: &str, value: &[u8]) {
        self.lock().kv.insert(key.to_owned(), value.to_vec());
        self.bump();
    }

    pub fn remove_local(&self, key: &str) {
        self.lock().kv.remove(key);
        self.bump();
    }

    pub fn remove_prefix_local(&self, prefix: &str) {
        self.lock().kv.retain(|k, _| !k.starts_with(prefix));
        self.bump();
    }

    /// Keeps the copy current until `stop` turns true.
    pub async fn run(self: Arc<Self>, session: Arc<Session>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        loop {
            let step = self.clone().list_and_watch(&session, &mut warned);
            tokio::select! {
                r = step => {
                    self.lock().live = false;
                    if let Err(e) = r {
                        if !warned {
                            log::warn!(
                                "nixl-etcd store: lost the watch on {}: {e}; reads are answered \
                                 from the last copy until etcd answers again, retrying",
                                self.prefix
                            );
                            warned = true;
                        }
                    }
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn list_and_watch(
        self: Arc<Self>,
        session: &Session,
        warned: &mut bool,
    ) -> Result<(), String> {
        let cause = |e: etcd_client::Error| etcd_error::cause(&e);
        let kv = session.etcd().kv_client();
        let (list, revision) =
            session::read_range(session.conn(), &kv, &self.prefix, 256, None, usize::MAX)
                .await
                .map_err(cause)?;
        let kvs: HashMap<String, Vec<u8>> = list
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        let etcd = session.etcd();
        let opts = etcd_client::WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watch = etcd.watch_client();
        let mut stream = watch
            .watch(self.prefix.as_bytes(), Some(opts))
            .await
            .map_err(cause)?;
        {
            let mut st = self.lock();
            st.kv = kvs;
            st.listed = true;
            st.live = true;
        }
        self.bump();
        if *warned {
            log::info!(
                "nixl-etcd store: watching {} again; etcd is reachable",
                self.prefix
            );
            *warned = false;
        }
        loop {
            let Some(msg) = stream.message().await.map_err(cause)? else {
                return Err("the watch stream ended".into());
            };
            if msg.canceled() {
                return Err(format!("etcd cancelled the watch: {}", msg.cancel_reason()));
            }
            if msg.events().is_empty() {
                continue;
            }
            {
                let mut st = self.lock();
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match ev.event_type() {
                        etcd_client::EventType::Put => {
                            st.kv.insert(key, kv.value().to_vec());
                        }
                        etcd_client::EventType::Delete => {
                            st.kv.remove(&key);
                        }
                    }
                }
            }
            self.bump();
        }
    }
}
