//! Readiness as a registry of pending tasks: a component registers and holds a [`Guard`];
//! dropping the guard marks it ready. `/ready` answers 200 when nothing is pending and lists
//! what still is otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

#[derive(Clone, Default)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

/// Held by a component until it is ready.
pub struct Guard {
    id: u64,
    pending: Arc<Mutex<BTreeMap<u64, String>>>,
}

impl Readiness {
    pub fn register(&self, what: impl Into<String>) -> Guard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.pending.lock().insert(id, what.into());
        Guard {
            id,
            pending: self.pending.clone(),
        }
    }

    /// What is still pending; empty when ready.
    pub fn pending(&self) -> Vec<String> {
        self.pending.lock().values().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending.lock().is_empty()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_block_readiness_until_dropped() {
        let r = Readiness::default();
        assert!(r.is_ready());
        let a = r.register("discovery web.default");
        let b = r.register("discovery db.default");
        assert_eq!(
            r.pending(),
            vec!["discovery web.default", "discovery db.default"]
        );
        drop(a);
        assert_eq!(r.pending(), vec!["discovery db.default"]);
        drop(b);
        assert!(r.is_ready());
    }
}
