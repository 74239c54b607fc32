//! A live copy of every key under one etcd prefix: a paged list, then one
//! long-lived watch from the list's revision + 1 (current in etcd, so a put
//! reaches the copy in about a millisecond). Re-listed after any watch
//! failure; while etcd is away, reads are answered from the last copy.
//!
//! The store's own writes enter the copy at once, before etcd has them
//! ("pending"), and again with their revision once etcd acknowledged them.
//! Every change carries a revision and the copy keeps, per key, only the
//! newest: a watch event that lags behind a write this store already
//! applied (or behind a delete, remembered as a tombstone until the watch
//! has passed it) is ignored, so a reader never sees an acknowledged write
//! undone or a deleted key come back.

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

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    value: Vec<u8>,
    /// etcd's mod revision; for a pending write, the newest revision known
    /// when it was made (a later change from etcd wins over it).
    rev: i64,
    /// Written by this store, not yet acknowledged by etcd.
    pending: bool,
}

/// A delete this store made: older puts of the keys it covers are ignored.
#[derive(Debug, Clone, PartialEq)]
struct Tomb {
    key: String,
    prefix: bool,
    rev: i64,
    pending: bool,
}

impl Tomb {
    fn covers(&self, key: &str) -> bool {
        if self.prefix {
            key.starts_with(&self.key)
        } else {
            key == self.key
        }
    }
}

/// One change seen on the watch.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Event {
    Put {
        key: String,
        value: Vec<u8>,
        rev: i64,
    },
    Delete {
        key: String,
        rev: i64,
    },
}

#[derive(Debug, Default)]
struct State {
    kv: HashMap<String, Entry>,
    tombs: Vec<Tomb>,
    /// The newest revision known (listed, watched or acknowledged).
    seen: i64,
    /// The newest revision the watch delivered: no event older than it
    /// can still come.
    watched: i64,
    /// Listed at least once: the copy is the truth (or was, before an outage).
    listed: bool,
    /// The watch is running now.
    live: bool,
}

impl State {
    fn newer(&self, key: &str, rev: i64) -> bool {
        let entry_ok = self.kv.get(key).is_none_or(|e| e.rev < rev);
        entry_ok && !self.tombs.iter().any(|t| t.covers(key) && t.rev >= rev)
    }

    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Put { key, value, rev } => {
                if self.newer(&key, rev) {
                    self.kv.insert(
                        key,
                        Entry {
                            value,
                            rev,
                            pending: false,
                        },
                    );
                }
                self.seen = self.seen.max(rev);
                self.watched = self.watched.max(rev);
            }
            Event::Delete { key, rev } => {
                if self.kv.get(&key).is_some_and(|e| e.rev < rev) {
                    self.kv.remove(&key);
                }
                self.seen = self.seen.max(rev);
                self.watched = self.watched.max(rev);
            }
        }
        let watched = self.watched;
        self.tombs.retain(|t| t.pending || t.rev > watched);
    }

    /// A fresh list at `rev`: the copy, with this store's pending writes and
    /// deletes kept over it (etcd does not have them yet).
    fn relist(&mut self, listed: HashMap<String, (Vec<u8>, i64)>, rev: i64) {
        let pending: Vec<(String, Entry)> = self.kv.drain().filter(|(_, e)| e.pending).collect();
        self.tombs.retain(|t| t.pending);
        self.kv = listed
            .into_iter()
            .filter(|(k, _)| !self.tombs.iter().any(|t| t.covers(k)))
            .map(|(k, (value, rev))| {
                (
                    k,
                    Entry {
                        value,
                        rev,
                        pending: false,
                    },
                )
            })
            .collect();
        self.kv.extend(pending);
        self.seen = self.seen.max(rev);
        self.watched = rev;
        self.listed = true;
    }

    fn put(&mut self, key: &str, value: &[u8], rev: Option<i64>) {
        match rev {
            None => {
                let rev = self.seen;
                self.kv.insert(
                    key.to_owned(),
                    Entry {
                        value: value.to_vec(),
                        rev,
                        pending: true,
                    },
                );
            }
            Some(rev) => {
                // A newer pending write of the same key waits for its own
                // acknowledgement.
                let superseded = self
                    .kv
                    .get(key)
                    .is_some_and(|e| (e.pending && e.value != value) || e.rev > rev);
                if !superseded {
                    self.kv.insert(
                        key.to_owned(),
                        Entry {
                            value: value.to_vec(),
                            rev,
                            pending: false,
                        },
                    );
                }
                self.seen = self.seen.max(rev);
            }
        }
    }

    fn delete(&mut self, key: &str, prefix: bool, rev: Option<i64>) {
        let pending = rev.is_none();
        let rev = rev.unwrap_or(self.seen);
        let tomb = Tomb {
            key: key.to_owned(),
            prefix,
            rev,
            pending,
        };
        // Acknowledged: keys written (pending) after the delete stay.
        self.kv
            .retain(|k, e| !tomb.covers(k) || (!pending && (e.pending || e.rev > rev)));
        self.tombs
            .retain(|t| !(t.key == tomb.key && t.prefix == tomb.prefix));
        self.seen = self.seen.max(rev);
        if pending || rev > self.watched {
            self.tombs.push(tomb);
        }
    }

    fn forget_pending(&mut self, key: &str) {
        if self.kv.get(key).is_some_and(|e| e.pending) {
            self.kv.remove(key);
        }
        self.tombs.retain(|t| !(t.pending && t.key == key));
    }
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
        st.listed.then(|| st.kv.get(key).map(|e| e.value.clone()))
    }

    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// This store's write of `key`: `rev` None when it is only queued,
    /// Some once etcd acknowledged it at that revision.
    pub fn put_local(&self, key: &str, value: &[u8], rev: Option<i64>) {
        self.lock().put(key, value, rev);
        self.bump();
    }

    /// This store's delete of `key` (or every key under it), queued (`rev`
    /// None) or acknowledged.
    pub fn delete_local(&self, key: &str, prefix: bool, rev: Option<i64>) {
        self.lock().delete(key, prefix, rev);
        self.bump();
    }

    /// A queued write that will never be sent (its writer is gone).
    pub fn forget_pending(&self, key: &str) {
        self.lock().forget_pending(key);
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
        let listed: HashMap<String, (Vec<u8>, i64)> = list
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    (kv.value().to_vec(), kv.mod_revision()),
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
            st.relist(listed, revision);
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
                    let rev = kv.mod_revision();
                    st.apply(match ev.event_type() {
                        etcd_client::EventType::Put => Event::Put {
                            key,
                            value: kv.value().to_vec(),
                            rev,
                        },
                        etcd_client::EventType::Delete => Event::Delete { key, rev },
                    });
                }
            }
            self.bump();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed() -> State {
        let mut st = State::default();
        st.relist(HashMap::new(), 10);
        st
    }

    fn value(st: &State, key: &str) -> Option<Vec<u8>> {
        st.kv.get(key).map(|e| e.value.clone())
    }

    fn put(key: &str, value: &str, rev: i64) -> Event {
        Event::Put {
            key: key.into(),
            value: value.into(),
            rev,
        }
    }

    // The race of the first mirror (events applied as they came): a SET
    // acknowledged at revision 12 was undone by the watch's lagging event
    // of revision 11 until the watch caught up.
    #[test]
    fn a_lagging_put_event_does_not_undo_an_acknowledged_write() {
        let mut st = listed();
        st.put("k", b"new", Some(12));
        st.apply(put("k", "old", 11));
        assert_eq!(value(&st, "k"), Some(b"new".to_vec()));
        st.apply(put("k", "new", 12));
        st.apply(put("k", "newer", 13));
        assert_eq!(value(&st, "k"), Some(b"newer".to_vec()));
    }

    #[test]
    fn a_lagging_event_does_not_bring_back_a_deleted_key() {
        let mut st = listed();
        st.apply(put("/a/x", "1", 11));
        st.delete("/a/", true, Some(14));
        // The watch still has revisions 12 and 13 to deliver.
        st.apply(put("/a/y", "2", 12));
        st.apply(put("/a/x", "3", 13));
        assert_eq!(value(&st, "/a/x"), None);
        assert_eq!(value(&st, "/a/y"), None);
        // Once the watch passed the delete, the tombstone is gone and newer
        // puts land.
        st.apply(Event::Delete {
            key: "/a/x".into(),
            rev: 14,
        });
        assert!(st.tombs.is_empty());
        st.apply(put("/a/x", "4", 15));
        assert_eq!(value(&st, "/a/x"), Some(b"4".to_vec()));
    }

    #[test]
    fn a_lagging_delete_event_does_not_remove_a_newer_write() {
        let mut st = listed();
        st.put("k", b"v2", Some(13));
        st.apply(Event::Delete {
            key: "k".into(),
            rev: 12,
        });
        assert_eq!(value(&st, "k"), Some(b"v2".to_vec()));
    }

    #[test]
    fn pending_writes_are_served_and_survive_a_relist() {
        let mut st = listed();
        st.put("k", b"queued", None);
        st.delete("gone", false, None);
        let mut list = HashMap::new();
        list.insert("gone".to_string(), (b"still in etcd".to_vec(), 9));
        list.insert("other".to_string(), (b"o".to_vec(), 9));
        st.relist(list, 20);
        assert_eq!(value(&st, "k"), Some(b"queued".to_vec()));
        assert_eq!(value(&st, "gone"), None);
        assert_eq!(value(&st, "other"), Some(b"o".to_vec()));
        // A newer change from elsewhere wins over the queued write.
        st.apply(put("k", "theirs", 21));
        assert_eq!(value(&st, "k"), Some(b"theirs".to_vec()));
        // Acknowledged later at a newer revision: ours is the newest.
        st.put("k", b"queued", Some(22));
        assert_eq!(value(&st, "k"), Some(b"queued".to_vec()));
        // A queued write whose writer is gone leaves the copy.
        st.put("q", b"never sent", None);
        st.forget_pending("q");
        assert_eq!(value(&st, "q"), None);
    }

    #[test]
    fn an_older_acknowledgement_does_not_replace_a_newer_queued_write() {
        let mut st = listed();
        st.put("k", b"first", None);
        st.put("k", b"second", None);
        st.put("k", b"first", Some(11));
        assert_eq!(value(&st, "k"), Some(b"second".to_vec()));
        st.put("k", b"second", Some(12));
        assert!(!st.kv["k"].pending);
    }
}
