//! When a failed attempt may be sent again, and how many retries the proxy may add in total.
//!
//! A request that never reached the peer (connection refused, TLS handshake failure) is safe to
//! resend whatever its method. Once bytes were written, only idempotent methods whose body we still
//! hold (empty, or buffered because small with a known length) are resent, and only for failures
//! that say nothing about the request itself (reset, timeout, 502/503/504). The budget caps retries
//! at a fraction of recent traffic so that retries cannot turn an outage into an overload.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

/// At most this many retries per request (so three attempts).
pub const MAX_RETRIES: u32 = 2;

/// Bodies up to this size with a known length are buffered so that the request can be replayed.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing was written: connect refused, connect timeout, TLS or identity check failed.
    BeforeWrite,
    /// The connection broke or the stream was reset after the request was (partly) sent.
    Reset,
    /// The attempt's own timeout elapsed.
    Timeout,
    /// The peer answered with this status.
    Status(StatusCode),
}

/// True for methods that may be repeated without changing the outcome.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// Is the failure of an attempt worth another attempt? `replayable`: the body is still held.
pub fn should_retry(method: &Method, replayable: bool, failure: Failure) -> bool {
    match failure {
        Failure::BeforeWrite => true,
        Failure::Reset | Failure::Timeout => is_idempotent(method) && replayable,
        Failure::Status(s) => matches!(s.as_u16(), 502..=504) && is_idempotent(method) && replayable,
    }
}

/// Retry budget over a sliding window: retries may add `ratio` of the requests of the window,
/// plus a floor of `min_per_sec` retries per second so that low traffic can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    state: Mutex<BudgetState>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 0.2, 10)
    }
}

impl RetryBudget {
    /// A budget over `window` allowing `ratio` extra and `min_per_sec` retries per second.
    pub fn new(window: Duration, ratio: f64, min_per_sec: u32) -> Self {
        Self { state: Mutex::new(BudgetState::new(window, ratio, min_per_sec, Instant::now())) }
    }

    /// Counts one request (each request, not each attempt).
    pub fn deposit(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).deposit(Instant::now());
    }

    /// Takes one retry from the budget if there is room.
    pub fn try_withdraw(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).try_withdraw(Instant::now())
    }
}

/// The arithmetic of [`RetryBudget`], with time passed in.
#[derive(Debug)]
pub struct BudgetState {
    window_secs: u64,
    ratio: f64,
    min_per_sec: u32,
    epoch: Instant,
    /// (second since epoch, requests, retries), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
}

impl BudgetState {
    /// An empty budget; `epoch` anchors the one-second buckets.
    pub fn new(window: Duration, ratio: f64, min_per_sec: u32, epoch: Instant) -> Self {
        Self { window_secs: window.as_secs().max(1), ratio, min_per_sec, epoch, buckets: VecDeque::new() }
    }

    fn bucket(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let sec = now.saturating_duration_since(self.epoch).as_secs();
        while self.buckets.front().is_some_and(|b| b.0 + self.window_secs <= sec) {
            self.buckets.pop_front();
        }
        if self.buckets.back().is_none_or(|b| b.0 != sec) {
            self.buckets.push_back((sec, 0, 0));
        }
        // Just pushed or checked: never empty here.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    /// Counts a request at `now`.
    pub fn deposit(&mut self, now: Instant) {
        self.bucket(now).1 += 1;
    }

    /// How many retries the window allows in total at `now`.
    pub fn allowed(&mut self, now: Instant) -> u64 {
        self.bucket(now);
        let requests: u64 = self.buckets.iter().map(|b| b.1).sum();
        (requests as f64 * self.ratio).floor() as u64 + u64::from(self.min_per_sec) * self.window_secs
    }

    /// Takes a retry at `now` if the window has room.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let allowed = self.allowed(now);
        let used: u64 = self.buckets.iter().map(|b| b.2).sum();
        if used < allowed {
            self.bucket(now).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        let s = |c: u16| Failure::Status(StatusCode::from_u16(c).unwrap());
        let cases = [
            (Method::GET, true, Failure::BeforeWrite, true),
            (Method::POST, false, Failure::BeforeWrite, true),
            (Method::GET, true, Failure::Reset, true),
            (Method::GET, false, Failure::Reset, false),
            (Method::POST, true, Failure::Reset, false),
            (Method::HEAD, true, Failure::Timeout, true),
            (Method::PUT, true, Failure::Timeout, false),
            (Method::OPTIONS, true, s(503), true),
            (Method::TRACE, true, s(502), true),
            (Method::GET, true, s(504), true),
            (Method::GET, true, s(500), false),
            (Method::GET, true, s(404), false),
            (Method::GET, true, s(200), false),
            (Method::DELETE, true, s(503), false),
            (Method::PATCH, true, s(503), false),
        ];
        for (m, replayable, f, want) in cases {
            assert_eq!(should_retry(&m, replayable, f), want, "{m} replayable={replayable} {f:?}");
        }
    }

    #[test]
    fn budget_arithmetic() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = BudgetState::new(Duration::from_secs(10), 0.2, 10, t0);
        // No traffic: the floor alone, 10/s over 10 s.
        assert_eq!(b.allowed(at(0)), 100);
        // 1000 requests in the window: 20 % more.
        for _ in 0..1000 {
            b.deposit(at(1));
        }
        assert_eq!(b.allowed(at(2)), 300);
        let mut granted = 0;
        for _ in 0..400 {
            if b.try_withdraw(at(2)) {
                granted += 1;
            }
        }
        assert_eq!(granted, 300, "exactly the budget is granted");
        assert!(!b.try_withdraw(at(5)));
        // Second 1 leaves the window at second 11: requests and retries of then are forgotten,
        // but the retries of second 2 still count until second 12.
        assert_eq!(b.allowed(at(11)), 100);
        assert!(!b.try_withdraw(at(11)));
        assert!(b.try_withdraw(at(12)));
    }
}
