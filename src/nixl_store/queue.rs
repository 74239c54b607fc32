//! One writer's writes on their way to etcd, in the order they were made.
//!
//! A write is queued before it is sent, so a slow or absent etcd never
//! holds up the connection for longer than the store's write wait, and the
//! writes of one writer reach etcd in order. A later write that makes an
//! earlier one pointless replaces it (the same key written again, or a
//! prefix deleted), so a long outage keeps at most one write per key.

use std::collections::VecDeque;

/// One request to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Keys written together under the writer's lease (NIXL metadata and
    /// its agent's marker, in one transaction); the first key names it.
    Put { kvs: Vec<(String, Vec<u8>)> },
    /// One key, or every key under it.
    Delete { key: String, prefix: bool },
}

impl Write {
    /// The key the write is about (the metadata key of a put).
    pub fn key(&self) -> &str {
        match self {
            Write::Put { kvs } => kvs.first().map(|(k, _)| k.as_str()).unwrap_or(""),
            Write::Delete { key, .. } => key,
        }
    }

    /// Whether every key this write touches is under `prefix`.
    fn within(&self, prefix: &str) -> bool {
        match self {
            Write::Put { kvs } => kvs.iter().all(|(k, _)| k.starts_with(prefix)),
            Write::Delete { key, .. } => key.starts_with(prefix),
        }
    }
}

/// The writes not yet acknowledged by etcd, each with its sequence number.
#[derive(Debug, Default)]
pub struct Queue {
    items: VecDeque<(u64, Write)>,
    next: u64,
}

impl Queue {
    /// Queues `w` and returns its sequence number (1, 2, ...).
    pub fn push(&mut self, w: Write) -> u64 {
        match &w {
            Write::Put { .. } => {
                let key = w.key().to_owned();
                self.items
                    .retain(|(_, q)| !(matches!(q, Write::Put { .. }) && q.key() == key));
            }
            Write::Delete { key, prefix: true } => self.items.retain(|(_, q)| !q.within(key)),
            Write::Delete { prefix: false, .. } => {}
        }
        self.next += 1;
        self.items.push_back((self.next, w));
        self.next
    }

    /// The oldest write, to send next.
    pub fn front(&self) -> Option<(u64, Write)> {
        self.items.front().cloned()
    }

    /// Removes the oldest write if it is still `seq` (it was sent).
    pub fn pop(&mut self, seq: u64) {
        if self.items.front().is_some_and(|(s, _)| *s == seq) {
            self.items.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Every write still queued, oldest first; the queue is left empty.
    pub fn drain(&mut self) -> Vec<Write> {
        self.items.drain(..).map(|(_, w)| w).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Write {
        Write::Put {
            kvs: vec![
                (k.into(), v.into()),
                (k[..=k.rfind('/').unwrap()].into(), vec![]),
            ],
        }
    }

    #[test]
    fn writes_stay_in_order_and_a_rewrite_replaces_the_older_one() {
        let mut q = Queue::default();
        assert_eq!(q.push(put("/ns/A/metadata", "1")), 1);
        assert_eq!(q.push(put("/ns/A/part", "x")), 2);
        assert_eq!(q.push(put("/ns/A/metadata", "2")), 3);
        assert_eq!(q.len(), 2);
        assert_eq!(q.front(), Some((2, put("/ns/A/part", "x"))));
        q.pop(1); // already replaced: nothing happens
        assert_eq!(q.len(), 2);
        q.pop(2);
        assert_eq!(q.front(), Some((3, put("/ns/A/metadata", "2"))));
    }

    #[test]
    fn a_prefix_delete_drops_what_it_covers_and_keeps_later_writes() {
        let mut q = Queue::default();
        q.push(put("/ns/A/metadata", "1"));
        q.push(put("/ns/B/metadata", "1"));
        let exact = Write::Delete {
            key: "/ns/B/metadata".into(),
            prefix: false,
        };
        q.push(exact.clone());
        q.push(Write::Delete {
            key: "/ns/A/".into(),
            prefix: true,
        });
        q.push(put("/ns/A/metadata", "again"));
        let left = q.drain();
        assert_eq!(
            left,
            vec![
                put("/ns/B/metadata", "1"),
                exact,
                Write::Delete {
                    key: "/ns/A/".into(),
                    prefix: true
                },
                put("/ns/A/metadata", "again"),
            ]
        );
        assert_eq!(q.len(), 0);
    }
}
