//! Local, non-replicated view of the proxies connected to this instance: which version each has
//! acknowledged, and which session currently owns each endpoint registration.

use std::collections::{HashMap, VecDeque};
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

/// Disconnected proxies still listed (the most recent ones): a proxy that went away shows as
/// such for a while, and a mesh whose pods come and go does not grow this instance's memory.
pub const KEEP_DISCONNECTED: usize = 1_024;

/// Sessions by id, plus which session owns each endpoint. Opening and closing a session cost the
/// same however many proxies are connected.
#[derive(Debug, Default)]
pub struct ProxyTracker {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<u64, ProxyInfo>,
    owners: HashMap<String, u64>,
    /// The newest session of each proxy (identity, instance).
    newest: HashMap<(String, String), u64>,
    /// Sessions that ended, oldest first (some may be gone from `sessions` already).
    ended: VecDeque<u64>,
    connected: usize,
}

impl Inner {
    /// Forgets the oldest ended sessions past [`KEEP_DISCONNECTED`].
    fn trim(&mut self) {
        while self.sessions.len() - self.connected > KEEP_DISCONNECTED {
            let Some(id) = self.ended.pop_front() else { break };
            if self.sessions.get(&id).is_some_and(|s| !s.connected) {
                self.forget(id);
            }
        }
        // Entries replaced by a reconnect are dropped from `ended` now and then, so a proxy that
        // reconnects again and again does not grow it either.
        if self.ended.len() > 2 * KEEP_DISCONNECTED.max(self.sessions.len() - self.connected) {
            let sessions = &self.sessions;
            self.ended.retain(|id| sessions.get(id).is_some_and(|s| !s.connected));
        }
    }

    fn forget(&mut self, id: u64) {
        if let Some(info) = self.sessions.remove(&id) {
            let key = (info.identity, info.instance);
            if self.newest.get(&key) == Some(&id) {
                self.newest.remove(&key);
            }
        }
    }
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
        // A reconnecting proxy replaces its previous entry once that one has ended.
        let key = (info.identity.clone(), info.instance.clone());
        if let Some(previous) = g.newest.insert(key, id)
            && g.sessions.get(&previous).is_some_and(|s| !s.connected)
        {
            g.sessions.remove(&previous);
        }
        g.sessions.insert(id, info);
        g.connected += 1;
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
        if !info.connected {
            return Vec::new();
        }
        info.connected = false;
        let eps = info.endpoints.clone();
        let key = (info.identity.clone(), info.instance.clone());
        g.connected -= 1;
        if g.newest.get(&key) == Some(&session) {
            g.ended.push_back(session);
            g.trim();
        } else {
            // The proxy reconnected meanwhile: its newer session is the one to show.
            g.sessions.remove(&session);
        }
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
        self.lock().connected
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
        // One entry for the proxy: the newest session, disconnected.
        let listed = t.list();
        assert_eq!(listed.len(), 1);
        assert!(!listed[0].connected);
        assert_eq!(t.connected(), 0);
        // A second close changes nothing.
        assert!(t.close(new).is_empty());
        assert_eq!(t.connected(), 0);
    }

    #[test]
    fn a_reconnect_after_the_end_replaces_the_ended_entry() {
        let t = ProxyTracker::default();
        let info = ProxyInfo { identity: "i".into(), instance: "x".into(), ..Default::default() };
        let old = t.open(info.clone());
        t.close(old);
        let new = t.open(info);
        assert_eq!(t.list().len(), 1);
        assert_eq!(t.connected(), 1);
        t.close(new);
        assert_eq!(t.list().len(), 1);
        // Reconnecting again and again keeps one entry and a bounded record of ended sessions.
        for _ in 0..5 * KEEP_DISCONNECTED {
            let s = t.open(ProxyInfo { identity: "i".into(), instance: "x".into(), ..Default::default() });
            t.close(s);
        }
        assert_eq!(t.list().len(), 1);
        assert!(t.lock().ended.len() <= 2 * KEEP_DISCONNECTED + 1);
    }

    #[test]
    fn proxies_that_come_and_go_are_kept_only_so_many() {
        let t = ProxyTracker::default();
        let live = t.open(ProxyInfo { identity: "i".into(), instance: "live".into(), ..Default::default() });
        for k in 0..KEEP_DISCONNECTED + 50 {
            let s = t.open(ProxyInfo { identity: "i".into(), instance: format!("pod-{k}"), ..Default::default() });
            t.close(s);
        }
        let listed = t.list();
        assert_eq!(listed.len(), KEEP_DISCONNECTED + 1);
        assert!(listed[0].connected && listed[0].instance == "live");
        // The most recent ones stay.
        assert!(listed.iter().any(|p| p.instance == format!("pod-{}", KEEP_DISCONNECTED + 49)));
        assert!(!listed.iter().any(|p| p.instance == "pod-0"));
        assert_eq!(t.connected(), 1);
        t.close(live);
        assert_eq!(t.connected(), 0);
        assert_eq!(t.list().len(), KEEP_DISCONNECTED);
    }
}
