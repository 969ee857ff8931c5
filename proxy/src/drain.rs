//! Graceful shutdown as a protocol: signal, drain with a deadline, then force.
//!
//! Listeners stop accepting when the drain is signalled; every connection runs as a tracked task
//! that finishes its in-flight work (HTTP connections get a graceful shutdown) and is aborted if
//! it is still running when the deadline forces the end. A tracked task costs nothing while it
//! runs: it is aborted through its handle, not by polling a signal beside its work.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

#[derive(Debug)]
struct Inner {
    draining: watch::Sender<bool>,
    forced: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
    /// The tracked tasks, to abort those left when the deadline passes. Finished ones are
    /// reaped as new ones start.
    tasks: Mutex<JoinSet<()>>,
}

/// Shared drain state of one process (cheap to clone).
#[derive(Debug, Clone)]
pub struct Drain(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self(Arc::new(Inner {
            draining: watch::channel(false).0,
            forced: watch::channel(false).0,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            tasks: Mutex::new(JoinSet::new()),
        }))
    }

    /// Starts draining: listeners stop accepting, connections finish what they do.
    pub fn start(&self) {
        self.0.draining.send_replace(true);
    }

    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        *self.0.draining.borrow()
    }

    /// Resolves when draining starts.
    pub async fn signaled(&self) {
        let mut rx = self.0.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Resolves when the deadline forced the end.
    pub async fn forced(&self) {
        let mut rx = self.0.forced.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Number of tracked tasks still running.
    pub fn active(&self) -> usize {
        self.0.active.load(Ordering::SeqCst)
    }

    /// Runs `work` as a tracked task: the drain waits for it, the force aborts it.
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if *self.0.forced.borrow() {
            // Past the deadline: nothing new starts.
            return;
        }
        let guard = Tracked::new(self.clone());
        let mut tasks = self.0.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move {
            work.await;
            drop(guard);
        });
    }

    /// Waits until every tracked task ended or `deadline` passed; then forces the rest.
    /// Returns the number of tasks that had to be cancelled.
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let idle = async {
            loop {
                let notified = self.0.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let left = match tokio::time::timeout(deadline, idle).await {
            Ok(()) => 0,
            Err(_) => self.active(),
        };
        self.0.forced.send_replace(true);
        self.0.tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
        left
    }
}

struct Tracked(Drain);

impl Tracked {
    fn new(drain: Drain) -> Self {
        drain.0.active.fetch_add(1, Ordering::SeqCst);
        Self(drain)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.idle.notify_waiters();
        }
    }
}

/// Runs a `hyper` server connection to its end and evaluates to its result. Once `drain` starts,
/// the connection is asked to finish (what is in flight completes, nothing new is taken) and
/// still runs to its end. A macro rather than a generic `async fn`: the compiler cannot prove
/// such a function's future `Send` for `hyper`'s connection futures.
macro_rules! serve_until_drained {
    ($conn:expr, $drain:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = $drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use serve_until_drained;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_work_then_forces_what_is_left() {
        let drain = Drain::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        drain.spawn(async move {
            let _ = rx.await;
        });
        drain.spawn(std::future::pending());
        assert_eq!(drain.active(), 2);
        drain.start();
        assert!(drain.is_draining());
        let _ = tx.send(());
        let started = tokio::time::Instant::now();
        let left = drain.wait_idle(Duration::from_millis(200)).await;
        assert_eq!(left, 1, "the pending task is forced");
        assert!(started.elapsed() >= Duration::from_millis(200));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while drain.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(drain.active(), 0);
        drain.spawn(std::future::pending());
        assert_eq!(drain.active(), 0, "nothing starts after the force");
    }
}
