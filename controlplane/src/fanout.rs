//! Who hears of a change. Each discovery session registers what its view holds (every endpoint,
//! its own cluster's, or the endpoints of the services it calls); one task follows the store and
//! hands each committed change to the sessions it concerns only. A commit then costs what it
//! concerns (the callers of one service for an endpoint's change) instead of a wake-up of every
//! connected proxy, each finding that the change is not its business.
//!
//! A session reads the state only after its interest is registered, so a change either reaches it
//! here or is already in the state it reads (the task hands out a revision only once the store
//! has published it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, watch};

use crate::discovery::{Scope, endpoint_id_service};
use crate::state::{ChangeKey, State};

/// Most changes kept for one session between two of its turns; past it the session sends a full
/// view of its scope instead of a list longer than the view.
pub const MAX_PENDING: usize = 16_384;

/// The sessions of one control-plane instance, indexed by what their views hold.
#[derive(Default)]
pub struct Fanout {
    index: Mutex<Index>,
    /// The newest revision whose changes have been handed to the sessions they concern.
    through: AtomicU64,
}

#[derive(Default)]
struct Index {
    inboxes: HashMap<u64, Arc<Inbox>>,
    /// Full views: every endpoint change concerns them.
    everything: HashSet<u64>,
    /// Own-cluster views (gateways), by cluster.
    by_cluster: HashMap<String, HashSet<u64>>,
    /// Scoped views, by service (`name.namespace`).
    by_service: HashMap<String, HashSet<u64>>,
}

/// What is waiting for one session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Changed resources that concern the session.
    pub keys: BTreeSet<ChangeKey>,
    /// The newest revision handed to the session: every change up to it that concerns the session
    /// is in `keys` or was taken before.
    pub through: u64,
    /// Too many changes to list, or a gap in the store's change log: send a full view.
    pub full: bool,
    /// The store has stopped; the session should end.
    pub closed: bool,
}

#[derive(Default)]
struct Inbox {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push<'a>(&self, keys: impl IntoIterator<Item = &'a ChangeKey>, revision: u64) {
        let mut p = self.lock();
        if !p.full {
            p.keys.extend(keys.into_iter().cloned());
            if p.keys.len() > MAX_PENDING {
                p.full = true;
                p.keys.clear();
            }
        }
        p.through = p.through.max(revision);
        drop(p);
        self.notify.notify_one();
    }

    fn push_full(&self, revision: u64) {
        let mut p = self.lock();
        p.full = true;
        p.keys.clear();
        p.through = p.through.max(revision);
        drop(p);
        self.notify.notify_one();
    }
}

/// What one session registered, so it can widen it and take it back.
#[derive(Debug, Clone)]
enum Registered {
    Everything,
    Cluster(String),
    Services(HashSet<String>),
}

impl Fanout {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest revision whose changes have been handed out. Read it before taking a session's
    /// pending changes, and those before reading the state: then every change up to it that
    /// concerns the session is in what was taken (or taken before).
    pub fn through(&self) -> u64 {
        self.through.load(Ordering::Acquire)
    }

    /// Registers a session whose view is `scope`, seen from cluster `viewer`. Dropping the
    /// membership takes the registration back.
    pub fn join(self: &Arc<Self>, session: u64, scope: &Scope, viewer: &str) -> Membership {
        let inbox = Arc::new(Inbox::default());
        let registered = match scope {
            Scope::All => Registered::Everything,
            Scope::OwnCluster => Registered::Cluster(viewer.to_string()),
            Scope::Services(_) => Registered::Services(HashSet::new()),
        };
        let mut membership = Membership { fanout: self.clone(), session, inbox: inbox.clone(), registered };
        {
            let mut index = self.index();
            index.inboxes.insert(session, inbox);
            match &membership.registered {
                Registered::Everything => {
                    index.everything.insert(session);
                }
                Registered::Cluster(c) => {
                    index.by_cluster.entry(c.clone()).or_default().insert(session);
                }
                Registered::Services(_) => {}
            }
        }
        if let Scope::Services(set) = scope {
            membership.add_services(set.iter());
        }
        membership
    }

    /// Hands the changes of `state` since `done` to the sessions they concern.
    fn deliver(&self, done: u64, state: &State) {
        let index = self.index();
        if index.inboxes.is_empty() {
            return;
        }
        let keys = if state.revision > done { state.changes_since(done) } else { None };
        let Some(keys) = keys else {
            // A gap in the change log (or a state older than the last one handed out): nobody
            // can be brought forward by a list of changes.
            for inbox in index.inboxes.values() {
                inbox.push_full(state.revision);
            }
            return;
        };
        if keys.is_empty() {
            return;
        }
        let mut to: HashMap<u64, Vec<&ChangeKey>> = HashMap::new();
        for key in &keys {
            let endpoint = match key {
                ChangeKey::Endpoint(id) => endpoint_id_service(id),
                // Every view holds every service's definition and the trust bundle.
                ChangeKey::Service(_) | ChangeKey::Trust => None,
            };
            let Some((cluster, service)) = endpoint else {
                for session in index.inboxes.keys() {
                    to.entry(*session).or_default().push(key);
                }
                continue;
            };
            let scoped = index.by_service.get(&service).into_iter().flatten();
            let gateways = index.by_cluster.get(cluster).into_iter().flatten();
            for session in index.everything.iter().chain(scoped).chain(gateways) {
                to.entry(*session).or_default().push(key);
            }
        }
        for (session, keys) in to {
            if let Some(inbox) = index.inboxes.get(&session) {
                inbox.push(keys, state.revision);
            }
        }
    }

    /// Follows the store: every published state's changes go to the sessions they concern.
    /// Returns when the store stops (every session is told to end).
    pub async fn follow(self: Arc<Self>, mut states: watch::Receiver<Arc<State>>) {
        let mut done = states.borrow_and_update().revision;
        self.through.store(done, Ordering::Release);
        loop {
            if states.changed().await.is_err() {
                for inbox in self.index().inboxes.values() {
                    inbox.lock().closed = true;
                    inbox.notify.notify_one();
                }
                return;
            }
            let state = states.borrow_and_update().clone();
            if state.revision == done {
                continue;
            }
            self.deliver(done, &state);
            done = state.revision;
            self.through.store(done, Ordering::Release);
        }
    }
}

/// A session's registration with the [`Fanout`].
pub struct Membership {
    fanout: Arc<Fanout>,
    session: u64,
    inbox: Arc<Inbox>,
    registered: Registered,
}

impl Membership {
    /// Waits until something is pending (returns at once if something already is).
    pub async fn wait(&self) {
        self.inbox.notify.notified().await;
    }

    /// Takes what is pending.
    pub fn take(&self) -> Pending {
        let mut p = self.inbox.lock();
        let taken = std::mem::take(&mut *p);
        // Closing is for good.
        p.closed = taken.closed;
        taken
    }

    /// Adds services to a scoped view's registration (before the state that brings their
    /// endpoints is read). Nothing for a full or own-cluster view, which holds them already.
    pub fn add_services<'a>(&mut self, services: impl IntoIterator<Item = &'a String>) {
        let Registered::Services(mine) = &mut self.registered else { return };
        let mut index = self.fanout.index();
        for s in services {
            if mine.insert(s.clone()) {
                index.by_service.entry(s.clone()).or_default().insert(self.session);
            }
        }
    }

    /// The session's view became the full view.
    pub fn widen_to_all(&mut self) {
        let mut index = self.fanout.index();
        remove(&mut index, self.session, &self.registered);
        index.everything.insert(self.session);
        self.registered = Registered::Everything;
    }
}

/// Takes a session's interest out of the index (its inbox stays).
fn remove(index: &mut Index, session: u64, registered: &Registered) {
    match registered {
        Registered::Everything => {
            index.everything.remove(&session);
        }
        Registered::Cluster(c) => {
            if let Some(set) = index.by_cluster.get_mut(c) {
                set.remove(&session);
                if set.is_empty() {
                    index.by_cluster.remove(c);
                }
            }
        }
        Registered::Services(services) => {
            for s in services {
                if let Some(set) = index.by_service.get_mut(s) {
                    set.remove(&session);
                    if set.is_empty() {
                        index.by_service.remove(s);
                    }
                }
            }
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut index = self.fanout.index();
        remove(&mut index, self.session, &self.registered);
        index.inboxes.remove(&self.session);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::state::{Command, Endpoint, Protocol};

    fn ep(cluster: &str, service: &str, instance: &str) -> Endpoint {
        let (name, ns) = service.split_once('.').unwrap();
        Endpoint {
            id: format!("{cluster}/{ns}/{name}/{instance}"),
            service: service.into(),
            cluster: cluster.into(),
            zone: "z1".into(),
            address: "127.0.0.1:1000".into(),
            identity: format!("spiffe://trellis.local/ns/{ns}/sa/{name}"),
            healthy: true,
            weight: 1,
            revision: 0,
            registrar: String::new(),
        }
    }

    /// A state with web and db in clusters a and b, at revision 4.
    fn state() -> State {
        let mut s = State::default();
        for (rev, (c, svc)) in [("a", "web.default"), ("a", "db.default"), ("b", "web.default"), ("b", "db.default")]
            .into_iter()
            .enumerate()
        {
            let cmd = Command::UpsertEndpoint { endpoint: ep(c, svc, "1"), protocol: Protocol::Http };
            s.apply(rev as u64 + 1, &cmd).unwrap();
        }
        s
    }

    fn scoped(services: &[&str]) -> Scope {
        Scope::Services(services.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())
    }

    fn endpoint_keys(p: &Pending) -> Vec<String> {
        p.keys
            .iter()
            .map(|k| match k {
                ChangeKey::Endpoint(id) => id.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_endpoint_change_reaches_only_the_sessions_whose_views_hold_it() {
        let mut s = state();
        let f = Fanout::new();
        let full = f.join(1, &Scope::All, "b");
        let web = f.join(2, &scoped(&["web.default"]), "b");
        let db = f.join(3, &scoped(&["db.default"]), "b");
        let gateway_a = f.join(4, &Scope::OwnCluster, "a");
        let gateway_b = f.join(5, &Scope::OwnCluster, "b");
        let done = s.revision;
        s.apply(5, &Command::SetEndpointHealth { id: "a/default/web/1".into(), healthy: false, registrar: None })
            .unwrap();
        f.deliver(done, &s);
        for m in [&full, &web, &gateway_a] {
            let p = m.take();
            assert_eq!(endpoint_keys(&p), ["a/default/web/1"]);
            assert_eq!(p.through, 5);
            assert!(!p.full && !p.closed);
        }
        for m in [&db, &gateway_b] {
            assert_eq!(m.take(), Pending::default(), "not its business");
        }
        // Taken means gone.
        assert_eq!(full.take(), Pending::default());
    }

    #[test]
    fn service_and_trust_changes_reach_every_session() {
        let mut s = state();
        let f = Fanout::new();
        let members = [f.join(1, &Scope::All, "a"), f.join(2, &scoped(&[]), "a"), f.join(3, &Scope::OwnCluster, "b")];
        let done = s.revision;
        let mut svc = s.services.get("web.default").unwrap().clone();
        svc.exported = !svc.exported;
        s.apply(5, &Command::UpsertService(svc)).unwrap();
        f.deliver(done, &s);
        for m in &members {
            let p = m.take();
            assert!(p.keys.contains(&ChangeKey::Service("web.default".into())), "{p:?}");
            assert_eq!(p.through, 5);
        }
    }

    #[test]
    fn a_gap_in_the_change_log_asks_every_session_for_a_full_view() {
        let s = state();
        let f = Fanout::new();
        let a = f.join(1, &scoped(&["web.default"]), "a");
        let b = f.join(2, &Scope::OwnCluster, "a");
        // A state older than what was handed out, then one whose log does not reach back.
        f.deliver(9, &s);
        let mut p = a.take();
        assert!(p.full && p.keys.is_empty(), "{p:?}");
        assert!(b.take().full);
        let mut trimmed = s.clone();
        trimmed.changes_dropped_through = 3;
        f.deliver(2, &trimmed);
        p = a.take();
        assert!(p.full, "{p:?}");
        assert_eq!(p.through, 4);
    }

    #[test]
    fn subscriptions_widen_and_leaving_clears_the_index() {
        let mut s = state();
        let f = Fanout::new();
        let mut m = f.join(1, &scoped(&["web.default"]), "a");
        let other = f.join(2, &scoped(&["web.default"]), "a");
        m.add_services(&["db.default".to_string()]);
        let done = s.revision;
        s.apply(5, &Command::SetEndpointHealth { id: "b/default/db/1".into(), healthy: false, registrar: None })
            .unwrap();
        f.deliver(done, &s);
        assert_eq!(endpoint_keys(&m.take()), ["b/default/db/1"]);
        assert_eq!(other.take(), Pending::default());
        m.widen_to_all();
        {
            let index = f.index();
            assert!(index.everything.contains(&1));
            assert_eq!(index.by_service.get("web.default").map(|s| s.len()), Some(1), "only the other session");
            assert!(!index.by_service.contains_key("db.default"));
        }
        drop(m);
        drop(other);
        let index = f.index();
        assert!(index.inboxes.is_empty() && index.everything.is_empty() && index.by_service.is_empty());
    }

    #[test]
    fn a_long_list_becomes_a_full_view() {
        let inbox = Inbox::default();
        let keys: Vec<ChangeKey> =
            (0..=MAX_PENDING).map(|i| ChangeKey::Endpoint(format!("a/default/web/{i}"))).collect();
        inbox.push(&keys, 7);
        inbox.push(&keys[..1], 8);
        let p = std::mem::take(&mut *inbox.lock());
        assert!(p.full && p.keys.is_empty());
        assert_eq!(p.through, 8);
    }

    #[tokio::test]
    async fn the_task_wakes_the_sessions_concerned_and_ends_them_with_the_store() {
        let mut s = state();
        let (tx, rx) = watch::channel(Arc::new(s.clone()));
        let f = Fanout::new();
        let web = f.join(1, &scoped(&["web.default"]), "a");
        let db = f.join(2, &scoped(&["db.default"]), "a");
        let task = tokio::spawn(f.clone().follow(rx));
        tokio::task::yield_now().await;
        s.apply(5, &Command::SetEndpointHealth { id: "a/default/web/1".into(), healthy: false, registrar: None })
            .unwrap();
        tx.send_replace(Arc::new(s.clone()));
        tokio::time::timeout(std::time::Duration::from_secs(5), web.wait()).await.expect("woken");
        assert_eq!(endpoint_keys(&web.take()), ["a/default/web/1"]);
        // Handed out before `through` moves on.
        while f.through() < 5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(db.take(), Pending::default());
        drop(tx);
        tokio::time::timeout(std::time::Duration::from_secs(5), db.wait()).await.expect("woken at the end");
        assert!(db.take().closed);
        assert!(db.take().closed, "for good");
        task.await.unwrap();
    }
}
