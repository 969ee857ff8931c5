//! Local, non-replicated view of the proxies connected to this instance: which version each has
//! acknowledged, and which session currently owns each endpoint registration.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What this instance knows about one connected proxy.
#[derive(Debug, Clone, Default)]
pub struct ProxyInfo {
    pub identity: String,
    pub cluster: String,
    pub instance: String,
    pub peer_address: String,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_nack: String,
    pub connected: bool,
    pub endpoints: Vec<String>,
    /// Which endpoints its view holds: `full`, `own cluster` (a gateway) or `N services`.
    pub view: String,
}

/// Sessions by id, plus which session owns each endpoint.
#[derive(Debug, Default)]
pub struct ProxyTracker {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<u64, ProxyInfo>,
    owners: HashMap<String, u64>,
}

impl ProxyTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session; it becomes the owner of its endpoints.
    pub fn open(&self, mut info: ProxyInfo) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        info.connected = true;
        let mut g = self.lock();
        for ep in &info.endpoints {
            g.owners.insert(ep.clone(), id);
        }
        // A reconnecting proxy replaces its previous, disconnected entry.
        let key = (info.identity.clone(), info.instance.clone());
        g.sessions.retain(|_, s| s.connected || (s.identity.clone(), s.instance.clone()) != key);
        g.sessions.insert(id, info);
        id
    }

    /// Records a version sent to a session.
    pub fn sent(&self, session: u64, version: u64) {
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.sent_version = version;
        }
    }

    /// Records what the session's view holds now.
    pub fn set_view(&self, session: u64, view: String) {
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.view = view;
        }
    }

    /// Records an ACK.
    pub fn acked(&self, session: u64, version: u64) {
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.acked_version = s.acked_version.max(version);
        }
    }

    /// Records a NACK.
    pub fn nacked(&self, session: u64, reason: &str) {
        if let Some(s) = self.lock().sessions.get_mut(&session) {
            s.last_nack = reason.to_string();
        }
    }

    /// Ends a session; returns the endpoints it still owned (no newer session took them over).
    pub fn close(&self, session: u64) -> Vec<String> {
        let mut g = self.lock();
        let Some(info) = g.sessions.get_mut(&session) else { return Vec::new() };
        info.connected = false;
        let eps = info.endpoints.clone();
        eps.into_iter()
            .filter(|ep| {
                if g.owners.get(ep) == Some(&session) {
                    g.owners.remove(ep);
                    true
                } else {
                    false
                }
            })
            .collect()
    }

    /// Whether some live session owns the endpoint.
    pub fn is_owned(&self, endpoint: &str) -> bool {
        self.lock().owners.contains_key(endpoint)
    }

    /// All known sessions, connected first.
    pub fn list(&self) -> Vec<ProxyInfo> {
        let mut v: Vec<ProxyInfo> = self.lock().sessions.values().cloned().collect();
        v.sort_by(|a, b| {
            b.connected.cmp(&a.connected).then(a.identity.cmp(&b.identity)).then(a.instance.cmp(&b.instance))
        });
        v
    }

    /// Number of connected sessions.
    pub fn connected(&self) -> usize {
        self.lock().sessions.values().filter(|s| s.connected).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_keeps_ownership_with_newest_session() {
        let t = ProxyTracker::default();
        let info =
            ProxyInfo { identity: "i".into(), instance: "x".into(), endpoints: vec!["e".into()], ..Default::default() };
        let old = t.open(info.clone());
        let new = t.open(info);
        // The old stream ends after the proxy reconnected: it must not take the endpoint down.
        assert!(t.close(old).is_empty());
        assert!(t.is_owned("e"));
        assert_eq!(t.close(new), vec!["e".to_string()]);
        assert!(!t.is_owned("e"));
    }
}
