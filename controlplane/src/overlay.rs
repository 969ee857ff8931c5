//! Local serving without a quorum.
//!
//! What a control plane observes in its own cluster (proxies registering, going away, endpoints
//! turning unhealthy) is written to the replicated store. While this instance is cut off from
//! the group's quorum those writes cannot commit; instead of refusing the proxies of its cluster
//! it keeps the observations here, in order, serves its proxies the replica's state with them
//! applied, and commits them, still in order, once the quorum answers again. Other clusters see
//! the changes after the heal, as the Raft log orders them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::state::{Command, State};
use crate::store::{Store, StoreError};

/// How long one write may wait for the group before the observation is kept for later.
const COMMIT_WAIT: Duration = Duration::from_secs(2);
/// How often kept observations are retried.
const RETRY_EVERY: Duration = Duration::from_millis(500);
/// Observations kept at most; beyond, the oldest are dropped with a warning (an endpoint whose
/// unhealthy mark was dropped stays as last committed until its proxy reconnects or the
/// orphan check after a restart).
const MAX_PENDING: usize = 50_000;

/// Observations of this cluster that wait for the quorum.
pub struct Overlay {
    store: Arc<dyn Store>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    pending: Mutex<VecDeque<Command>>,
    changed: watch::Sender<u64>,
}

impl Overlay {
    pub fn new(store: Arc<dyn Store>, metrics: Option<Arc<crate::metrics::Metrics>>) -> Arc<Self> {
        Arc::new(Self { store, metrics, pending: Mutex::new(VecDeque::new()), changed: watch::channel(0).0 })
    }

    fn changed(&self) {
        if let Some(m) = &self.metrics {
            m.overlay_pending.set(self.len() as i64);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Command>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `cmd`, an observation of this cluster. When the group cannot take it now (no
    /// leader, no quorum, no answer within 2 s) it is kept, served locally and committed later;
    /// only a refusal by the state machine is an error.
    pub async fn observe(&self, cmd: Command) -> Result<(), StoreError> {
        // Behind kept observations, a new one waits its turn: the order of what a cluster saw
        // is the order it commits in.
        if !self.lock().is_empty() {
            self.keep(cmd);
            return Ok(());
        }
        match tokio::time::timeout(COMMIT_WAIT, self.store.propose(cmd.clone())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e @ (StoreError::Rejected(_) | StoreError::Corrupt(_) | StoreError::Io(_)))) => Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the group cannot commit this observation now; serving it locally until it can");
                self.keep(cmd);
                Ok(())
            }
            Err(_) => {
                tracing::warn!("no commit within 2 s; serving this observation locally until the quorum answers");
                self.keep(cmd);
                Ok(())
            }
        }
    }

    fn keep(&self, cmd: Command) {
        {
            let mut p = self.lock();
            p.push_back(cmd);
            while p.len() > MAX_PENDING {
                p.pop_front();
                tracing::warn!("more than {MAX_PENDING} observations wait for the quorum; the oldest is dropped");
            }
        }
        self.changed();
    }

    /// Observations waiting for the quorum.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes whenever observations are kept or committed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// `state` as this cluster's proxies should see it: with the kept observations applied in
    /// order (at the same revision). `None` when nothing is kept.
    pub fn view(&self, state: &State) -> Option<State> {
        let pending = self.lock();
        if pending.is_empty() {
            return None;
        }
        let mut view = state.clone();
        for cmd in pending.iter() {
            // One that the state refuses (e.g. a change to an endpoint removed meanwhile) is
            // skipped here as it will be at commit.
            let _ = view.apply(state.revision, cmd);
        }
        Some(view)
    }

    /// Commits kept observations in order, until the first the group cannot take yet (a store
    /// that fails with I/O or damage stops the instance; its head stays until then).
    pub async fn flush(&self) {
        loop {
            let Some(cmd) = self.lock().front().cloned() else { return };
            // A registration kept here is stale if another instance of the cluster registered the
            // same endpoint meanwhile (its proxy moved there): that one stands.
            if let Command::UpsertEndpoint { endpoint, .. } = &cmd
                && self.store.current().endpoints.get(&endpoint.id).is_some_and(|e| e.registrar != endpoint.registrar)
            {
                tracing::info!(endpoint = %endpoint.id, "another instance registered this endpoint meanwhile; dropping ours");
                {
                    let mut p = self.lock();
                    if p.front() == Some(&cmd) {
                        p.pop_front();
                    }
                }
                // Proxies shown it must see the view without it.
                self.changed();
                continue;
            }
            let result = tokio::time::timeout(COMMIT_WAIT, self.store.propose(cmd.clone())).await;
            match result {
                Ok(Ok(_)) | Ok(Err(StoreError::Rejected(_))) => {
                    if let Ok(Err(e)) = &result {
                        tracing::debug!(error = %e, "a kept observation no longer applies; dropped");
                    }
                    {
                        let mut p = self.lock();
                        if p.front() == Some(&cmd) {
                            p.pop_front();
                        }
                    }
                    if self.lock().is_empty() {
                        tracing::info!("every observation kept during the cut is committed");
                    }
                    self.changed();
                }
                _ => return,
            }
        }
    }

    /// Retries kept observations until the instance stops.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RETRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_empty() {
                self.flush().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, Protocol};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A store that refuses writes while `down`, and otherwise applies them.
    struct Flaky {
        down: AtomicBool,
        state: watch::Sender<Arc<State>>,
    }

    impl Store for Flaky {
        fn propose(&self, cmd: Command) -> crate::store::ProposeFuture<'_> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable("no quorum".into()));
                }
                let mut s = (**self.state.borrow()).clone();
                let index = s.revision + 1;
                let r = s.apply(index, &cmd);
                self.state.send_replace(Arc::new(s));
                r.map(|()| index).map_err(StoreError::from)
            })
        }

        fn subscribe(&self) -> watch::Receiver<Arc<State>> {
            self.state.subscribe()
        }
    }

    fn upsert(id: &str) -> Command {
        Command::UpsertEndpoint {
            endpoint: Endpoint {
                id: id.into(),
                service: "web.default".into(),
                cluster: "c".into(),
                zone: "z".into(),
                address: "198.18.0.3:1".into(),
                identity: "spiffe://trellis.local/ns/default/sa/web".into(),
                healthy: true,
                weight: 1,
                revision: 0,
                registrar: "c/cp-1".into(),
            },
            protocol: Protocol::Http,
        }
    }

    #[tokio::test]
    async fn observations_wait_for_the_quorum_are_served_meanwhile_and_commit_in_order() {
        let store =
            Arc::new(Flaky { down: AtomicBool::new(true), state: watch::channel(Arc::new(State::default())).0 });
        let overlay = Overlay::new(store.clone(), None);
        overlay.observe(upsert("c/default/web/1")).await.unwrap();
        overlay.observe(upsert("c/default/web/2")).await.unwrap();
        overlay
            .observe(Command::SetEndpointHealth { id: "c/default/web/1".into(), healthy: false, registrar: None })
            .await
            .unwrap();
        assert_eq!(overlay.len(), 3);
        assert!(store.current().endpoints.is_empty(), "nothing committed while the quorum is away");
        let view = overlay.view(&store.current()).expect("a view");
        assert_eq!(view.endpoints.len(), 2);
        assert!(!view.endpoints["c/default/web/1"].healthy, "observations apply in order");
        // The quorum is back: everything commits, in order, and the view is the state again.
        store.down.store(false, Ordering::SeqCst);
        overlay.flush().await;
        assert!(overlay.is_empty());
        assert!(overlay.view(&store.current()).is_none());
        let s = store.current();
        assert_eq!(s.endpoints.len(), 2);
        assert!(!s.endpoints["c/default/web/1"].healthy);
        // With nothing kept, a write goes straight to the store.
        overlay.observe(upsert("c/default/web/3")).await.unwrap();
        assert!(overlay.is_empty() && store.current().endpoints.contains_key("c/default/web/3"));
    }

    #[tokio::test]
    async fn a_kept_registration_does_not_take_back_an_endpoint_another_instance_registered() {
        let store =
            Arc::new(Flaky { down: AtomicBool::new(true), state: watch::channel(Arc::new(State::default())).0 });
        let overlay = Overlay::new(store.clone(), None);
        overlay.observe(upsert("c/default/web/1")).await.unwrap();
        // Meanwhile the proxy moved to cp-2, which committed its registration.
        store.down.store(false, Ordering::SeqCst);
        let Command::UpsertEndpoint { mut endpoint, protocol } = upsert("c/default/web/1") else { unreachable!() };
        endpoint.registrar = "c/cp-2".into();
        store.propose(Command::UpsertEndpoint { endpoint, protocol }).await.unwrap();
        overlay.flush().await;
        assert!(overlay.is_empty());
        assert_eq!(store.current().endpoints["c/default/web/1"].registrar, "c/cp-2");
    }

    #[tokio::test]
    async fn a_kept_observation_that_no_longer_applies_is_dropped_not_retried_forever() {
        let store =
            Arc::new(Flaky { down: AtomicBool::new(true), state: watch::channel(Arc::new(State::default())).0 });
        let overlay = Overlay::new(store.clone(), None);
        overlay.observe(Command::DeleteEndpoint { id: "c/default/web/9".into(), registrar: None }).await.unwrap();
        overlay.observe(upsert("c/default/web/1")).await.unwrap();
        store.down.store(false, Ordering::SeqCst);
        overlay.flush().await;
        assert!(overlay.is_empty());
        assert!(store.current().endpoints.contains_key("c/default/web/1"));
    }
}
