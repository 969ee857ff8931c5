//! Endpoint choice: power of two choices over a peak-EWMA latency estimate.
//!
//! Each endpoint carries a latency estimate that jumps up at once on a slow or failed attempt
//! ("peak") and otherwise moves towards new samples with a time-based decay. While an endpoint is
//! idle its estimate decays towards zero, so an endpoint that was penalised gets probed again after
//! a while instead of being starved forever. The score is `estimate * (in_flight + 1) / weight`;
//! two distinct eligible endpoints are drawn at random and the lower score wins.
//!
//! [`choose`] is pure (randomness injected); [`Balancer`] keeps the per-endpoint state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::routes::Endpoint;

/// Estimate of an endpoint never used: neutral, neither preferred over nor starved by
/// endpoints with real samples on a LAN (Linkerd uses the same default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A failed attempt counts as this much latency, so choice moves away from it.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Decay time constant of the estimate.
pub const DECAY: Duration = Duration::from_secs(10);

/// One eligible-or-not endpoint as seen by [`choose`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Ready per control plane.
    pub healthy: bool,
    /// Already tried by this request (retries go elsewhere).
    pub excluded: bool,
    /// Relative weight (0 is treated as 1).
    pub weight: u32,
    /// Current latency estimate in seconds.
    pub estimate: f64,
    /// Requests in flight.
    pub in_flight: u32,
}

impl Candidate {
    /// Lower is better.
    pub fn score(&self) -> f64 {
        self.estimate * (f64::from(self.in_flight) + 1.0) / f64::from(self.weight.max(1))
    }
}

/// Picks the index of an endpoint: power of two choices among healthy, non-excluded candidates.
pub fn choose(candidates: &[Candidate], rng: &mut fastrand::Rng) -> Option<usize> {
    let eligible = |c: &&Candidate| c.healthy && !c.excluded;
    // The `k`-th eligible candidate's index (found by scanning: nothing is allocated per pick).
    let nth = |k: usize| candidates.iter().enumerate().filter(|(_, c)| eligible(c)).nth(k).map(|(i, _)| i);
    match candidates.iter().filter(eligible).count() {
        0 => None,
        1 => nth(0),
        n => {
            let a = rng.usize(0..n);
            // A second, distinct draw: shift by 1..n so it never equals the first.
            let b = (a + 1 + rng.usize(0..n - 1)) % n;
            let (a, b) = (nth(a)?, nth(b)?);
            Some(if candidates[b].score() < candidates[a].score() { b } else { a })
        }
    }
}

/// A peak-EWMA latency estimate.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    estimate: f64,
    updated: Instant,
    sampled: bool,
}

impl PeakEwma {
    /// A fresh estimate at [`DEFAULT_RTT`].
    pub fn new(now: Instant) -> Self {
        Self { estimate: DEFAULT_RTT.as_secs_f64(), updated: now, sampled: false }
    }

    fn decay(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }

    /// The estimate at `now`, decayed towards zero since the last sample.
    pub fn get(&self, now: Instant) -> f64 {
        self.estimate * self.decay(now)
    }

    /// Adds a sample: a slower one replaces the estimate (peak), a faster one is averaged in.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64();
        // The neutral start is a placeholder, not a measurement: the first sample replaces it.
        if !self.sampled || rtt > self.estimate {
            self.estimate = rtt;
        } else {
            let w = self.decay(now);
            self.estimate = self.estimate * w + rtt * (1.0 - w);
        }
        self.updated = now;
        self.sampled = true;
    }
}

/// Consecutive failed attempts after which an endpoint is set aside (passive outlier detection).
const EJECT_AFTER: u32 = 5;
/// How long an endpoint is set aside; it is tried again afterwards.
const EJECT_FOR: Duration = Duration::from_secs(10);

/// How long an endpoint that appeared, came back healthy or moved to a new address waits before
/// it takes traffic while other endpoints serve without failing (failback hysteresis, and a slow
/// start for new instances): a backend that flaps does not pull traffic back and forth. When the
/// others fail, or there is nothing else, it is used at once.
pub const FAILBACK_HOLD: Duration = Duration::from_secs(1);

/// Live load of one endpoint.
#[derive(Debug)]
pub struct EndpointLoad {
    ewma: Mutex<PeakEwma>,
    in_flight: AtomicU32,
    /// Failed attempts in a row.
    failures: AtomicU32,
    /// Set aside until then, after [`EJECT_AFTER`] failures in a row.
    ejected_until: Mutex<Option<Instant>>,
    /// The address this state is about: an endpoint that moves starts afresh.
    address: String,
    /// Held back until then while others can serve ([`FAILBACK_HOLD`]).
    held_until: Mutex<Option<Instant>>,
    /// Healthy per control plane when last seen (a return to health starts a hold).
    was_healthy: std::sync::atomic::AtomicBool,
}

impl EndpointLoad {
    fn new(now: Instant, ep: &Endpoint, held: bool) -> Self {
        Self {
            ewma: Mutex::new(PeakEwma::new(now)),
            in_flight: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            address: ep.address.clone(),
            held_until: Mutex::new(held.then_some(now + FAILBACK_HOLD)),
            was_healthy: std::sync::atomic::AtomicBool::new(ep.healthy),
        }
    }

    /// Notes the control plane's health; a return to health starts a hold and forgets the
    /// failures seen before (they were the outage the control plane has now seen end).
    fn observe_health(&self, healthy: bool, now: Instant) {
        if self.was_healthy.swap(healthy, Ordering::Relaxed) != healthy && healthy {
            *self.held_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + FAILBACK_HOLD);
            *self.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.failures.store(0, Ordering::Relaxed);
            *self.ewma.lock().unwrap_or_else(|p| p.into_inner()) = PeakEwma::new(now);
        }
    }

    fn held(&self, now: Instant) -> bool {
        self.held_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| now < t)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| now < t)
    }

    fn candidate(&self, ep: &Endpoint, excluded: bool, now: Instant) -> Candidate {
        Candidate {
            // The control plane's health, and what this proxy saw itself: an endpoint that keeps
            // failing is set aside for a while even if its control plane still lists it healthy,
            // so the next tier takes over.
            healthy: ep.healthy && !self.ejected(now),
            excluded,
            weight: ep.weight,
            estimate: self.ewma.lock().unwrap_or_else(|p| p.into_inner()).get(now),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Marks one attempt in flight until the guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        LoadGuard { load: self.clone(), started: Instant::now() }
    }

    fn record(&self, rtt: Duration) {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner()).observe(rtt, Instant::now());
    }
}

/// One attempt in flight on an endpoint.
#[derive(Debug)]
pub struct LoadGuard {
    load: Arc<EndpointLoad>,
    started: Instant,
}

impl LoadGuard {
    /// The attempt got an answer: its latency is a sample.
    pub fn success(self) {
        self.load.failures.store(0, Ordering::Relaxed);
        self.load.record(self.started.elapsed());
    }

    /// The attempt failed: counts as [`FAILURE_PENALTY`]; [`EJECT_AFTER`] in a row set the
    /// endpoint aside for [`EJECT_FOR`]. True when this failure set it aside.
    pub fn failure(self) -> bool {
        let ejected = self.load.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER;
        if ejected {
            self.load.failures.store(0, Ordering::Relaxed);
            *self.load.ejected_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + EJECT_FOR);
        }
        self.load.record(FAILURE_PENALTY.max(self.started.elapsed()));
        ejected
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        // A cancelled attempt (client went away) records no sample: it says nothing about the
        // endpoint. Only the in-flight count is released.
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-endpoint load state and the random source for choices.
#[derive(Debug)]
pub struct Balancer {
    state: Mutex<State>,
    /// This proxy's place, for locality tiers.
    locality: Locality,
}

#[derive(Debug)]
struct State {
    loads: HashMap<String, Arc<EndpointLoad>>,
    rng: fastrand::Rng,
    /// Work space of one pick, kept between picks so that a pick allocates nothing.
    candidates: Vec<Candidate>,
    slots: Vec<Slot>,
}

/// What one pick notes about an endpoint besides its [`Candidate`].
#[derive(Debug, Clone, Copy)]
struct Slot {
    reachable: bool,
    held: bool,
    /// No failed attempt since its last success.
    clean: bool,
    tier: u8,
}

/// Where a proxy runs. Endpoints are tried in tiers: its zone of its cluster, then its cluster,
/// then other clusters of its region, then the other regions; a tier is used while it has a
/// healthy endpoint not yet tried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub cluster: String,
    pub zone: String,
}

impl Locality {
    /// The tier of `ep` seen from here, in `region` (this proxy's cluster's, empty when unknown):
    /// 0 is nearest. Without a locality every endpoint is tier 0.
    pub fn tier(&self, ep: &Endpoint, region: &str) -> u8 {
        if self.cluster.is_empty() {
            0
        } else if ep.cluster != self.cluster {
            if region.is_empty() || ep.region == region { 2 } else { 3 }
        } else if ep.zone != self.zone {
            1
        } else {
            0
        }
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(fastrand::Rng::new())
    }
}

impl Balancer {
    /// A balancer drawing from `rng`.
    pub fn new(rng: fastrand::Rng) -> Self {
        let state = State { loads: HashMap::new(), rng, candidates: Vec::new(), slots: Vec::new() };
        Self { state: Mutex::new(state), locality: Locality::default() }
    }

    /// A balancer that prefers endpoints near `locality`.
    pub fn with_locality(locality: Locality) -> Self {
        Self { locality, ..Self::default() }
    }

    /// Picks one of `endpoints`, skipping those whose id is in `tried`.
    pub fn pick(&self, endpoints: &[Arc<Endpoint>], tried: &[String]) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        self.pick_in(endpoints, tried, "")
    }

    /// As [`Balancer::pick`], for a proxy whose cluster is in `region`: other clusters of that
    /// region come before the rest.
    pub fn pick_in(
        &self,
        endpoints: &[Arc<Endpoint>],
        tried: &[String],
        region: &str,
    ) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        self.pick_where(endpoints, &|ep| tried.contains(&ep.id), region, &|_| true)
    }

    /// As [`Balancer::pick_in`], skipping the endpoints `tried` says this request already tried,
    /// among the endpoints this proxy can reach now (`reachable`: false for an endpoint behind
    /// gateways that are all down). Allocates nothing once the service's endpoints are known.
    pub fn pick_where(
        &self,
        endpoints: &[Arc<Endpoint>],
        tried: &dyn Fn(&Endpoint) -> bool,
        region: &str,
        reachable: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { loads, rng, candidates, slots } = &mut *state;
        candidates.clear();
        slots.clear();
        // A service this proxy already sends to: its new endpoints are held back a moment.
        let known = endpoints.iter().any(|ep| loads.contains_key(ep.id.as_str()));
        for ep in endpoints {
            let reachable = reachable(ep);
            let load = match loads.get_mut(ep.id.as_str()) {
                Some(load) => {
                    if load.address != ep.address {
                        // A new instance at a new address: the old one's failures are not its own.
                        *load = Arc::new(EndpointLoad::new(now, ep, true));
                    }
                    load
                }
                None => loads.entry(ep.id.clone()).or_insert_with(|| Arc::new(EndpointLoad::new(now, ep, known))),
            };
            // Back to health, or reachable again (its gateway is back): held a moment.
            load.observe_health(ep.healthy && reachable, now);
            let mut candidate = load.candidate(ep, tried(ep), now);
            candidate.excluded |= !reachable;
            candidates.push(candidate);
            slots.push(Slot {
                reachable,
                held: load.held(now),
                clean: load.failures.load(Ordering::Relaxed) == 0,
                tier: self.locality.tier(ep, region),
            });
        }
        if !candidates.iter().any(|c| c.healthy && !c.excluded) {
            // Everything usable is set aside: trust the control plane's health rather than fail.
            for ((c, ep), slot) in candidates.iter_mut().zip(endpoints).zip(slots.iter()) {
                c.healthy = ep.healthy && slot.reachable;
            }
        }
        // Endpoints on hold sit out while another can serve that has not just failed.
        if candidates.iter().zip(slots.iter()).any(|(c, s)| c.healthy && !c.excluded && !s.held && s.clean) {
            for (c, s) in candidates.iter_mut().zip(slots.iter()) {
                c.excluded |= s.held;
            }
        }
        // The nearest tier that still has a usable endpoint; the others sit this pick out.
        let best =
            candidates.iter().zip(slots.iter()).filter(|(c, _)| c.healthy && !c.excluded).map(|(_, s)| s.tier).min()?;
        for (c, s) in candidates.iter_mut().zip(slots.iter()) {
            if s.tier != best {
                c.excluded = true;
            }
        }
        let i = choose(candidates, rng)?;
        let ep = &endpoints[i];
        let load = loads.get(ep.id.as_str())?.clone();
        Some((ep.clone(), load))
    }

    /// The tier of `ep` for this proxy, in `region` (see [`Locality::tier`]).
    pub fn tier(&self, ep: &Endpoint, region: &str) -> u8 {
        self.locality.tier(ep, region)
    }

    /// Forgets endpoints that are no longer known.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).loads.retain(|id, _| live(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(estimate_ms: f64, in_flight: u32, weight: u32, healthy: bool) -> Candidate {
        Candidate { healthy, excluded: false, weight, estimate: estimate_ms / 1000.0, in_flight }
    }

    fn histogram(cands: &[Candidate], n: usize, seed: u64) -> Vec<usize> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0; cands.len()];
        for _ in 0..n {
            if let Some(i) = choose(cands, &mut rng) {
                counts[i] += 1;
            }
        }
        counts
    }

    #[test]
    fn p2c_table() {
        const N: usize = 10_000;
        // (candidates, per-index bounds on the share of N picks, inclusive)
        type Case = (Vec<Candidate>, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            // A slow endpoint among four fast ones: it only wins when drawn twice, which P2C never
            // does, so it gets nothing; the fast ones share evenly.
            (
                vec![c(100.0, 0, 1, true), c(1.0, 0, 1, true), c(1.0, 0, 1, true), c(1.0, 0, 1, true)],
                vec![(0, 0), (3000, 3700), (3000, 3700), (3000, 3700)],
            ),
            // Unhealthy is never picked, even when it looks fastest.
            (
                vec![c(0.1, 0, 1, false), c(5.0, 0, 1, true), c(5.0, 0, 1, true)],
                vec![(0, 0), (4500, 5500), (4500, 5500)],
            ),
            // In-flight load counts: 10 ms idle beats 1 ms with 20 in flight.
            (vec![c(1.0, 20, 1, true), c(10.0, 0, 1, true)], vec![(0, 0), (N, N)]),
            // Weight divides the score.
            (vec![c(4.0, 0, 1, true), c(6.0, 0, 2, true)], vec![(0, 0), (N, N)]),
            // Equal scores: the first draw wins ties, so both get about half.
            (vec![c(2.0, 0, 1, true), c(2.0, 0, 1, true)], vec![(4500, 5500), (4500, 5500)]),
            // Nothing eligible.
            (vec![c(1.0, 0, 1, false)], vec![(0, 0)]),
        ];
        for (i, (cands, bounds)) in cases.iter().enumerate() {
            let got = histogram(cands, N, 42 + i as u64);
            for (j, (lo, hi)) in bounds.iter().enumerate() {
                assert!(
                    got[j] >= *lo && got[j] <= *hi,
                    "case {i}: endpoint {j} picked {} times, want {lo}..={hi}",
                    got[j]
                );
            }
        }
    }

    #[test]
    fn slow_endpoint_among_two_is_picked_far_less_with_real_estimates() {
        // The slow endpoint only wins against a fast one loaded with 3 in-flight requests if
        // 4 x fast > slow; with real estimates it does not, so it is (almost) never chosen.
        let mut rng = fastrand::Rng::with_seed(1);
        let now = Instant::now();
        let mut fast = PeakEwma::new(now);
        let mut slow = PeakEwma::new(now);
        // One sample every 100 ms for 30 s: the estimate moves with time, not with the count.
        for i in 1..=300u64 {
            let t = now + Duration::from_millis(100 * i);
            fast.observe(Duration::from_millis(2), t);
            slow.observe(Duration::from_millis(80), t);
        }
        let t = now + Duration::from_secs(30);
        assert!(fast.get(t) < 0.004, "fast estimate {}", fast.get(t));
        assert!((slow.get(t) - 0.080).abs() < 1e-9);
        let cands = [
            Candidate { healthy: true, excluded: false, weight: 1, estimate: slow.get(t), in_flight: 0 },
            Candidate { healthy: true, excluded: false, weight: 1, estimate: fast.get(t), in_flight: 0 },
            Candidate { healthy: true, excluded: false, weight: 1, estimate: fast.get(t), in_flight: 3 },
        ];
        let mut slow_picks = 0;
        for _ in 0..10_000 {
            if choose(&cands, &mut rng) == Some(0) {
                slow_picks += 1;
            }
        }
        assert!(slow_picks < 100, "slow endpoint picked {slow_picks} times of 10000");
    }

    #[test]
    fn excluded_endpoints_are_skipped() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut cands = vec![c(1.0, 0, 1, true), c(50.0, 0, 1, true)];
        cands[0].excluded = true;
        for _ in 0..100 {
            assert_eq!(choose(&cands, &mut rng), Some(1));
        }
        cands[1].excluded = true;
        assert_eq!(choose(&cands, &mut rng), None);
    }

    #[test]
    fn ewma_peaks_decays_and_penalises() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(t0);
        assert!((e.get(t0) - 0.030).abs() < 1e-9, "neutral start");
        e.observe(Duration::from_millis(500), t0);
        assert!((e.get(t0) - 0.5).abs() < 1e-9, "a peak replaces the estimate at once");
        // A fast sample 10 s later is averaged in with weight 1 - e^-1.
        e.observe(Duration::from_millis(1), t0 + DECAY);
        let want = 0.5 * (-1f64).exp() + 0.001 * (1.0 - (-1f64).exp());
        assert!((e.get(t0 + DECAY) - want).abs() < 1e-9);
        // Idle for another 30 s: decays towards zero so the endpoint gets probed again.
        let later = e.get(t0 + DECAY * 4);
        assert!(later < want * 0.06, "{later}");
        // The first sample replaces the neutral start, even when it is lower.
        let mut fresh = PeakEwma::new(t0);
        fresh.observe(Duration::from_millis(1), t0);
        assert!((fresh.get(t0) - 0.001).abs() < 1e-9);
    }

    #[test]
    fn balancer_moves_away_from_failures() {
        let ep = |id: &str| {
            Arc::new(Endpoint {
                id: id.into(),
                service: "web.default".parse().unwrap(),
                cluster: "local".into(),
                zone: "zone-a".into(),
                region: String::new(),
                gateways: Vec::new(),
                via_gateways: false,
                address: "127.0.0.1:1".into(),
                identity: None,
                healthy: true,
                weight: 1,
            })
        };
        let eps = vec![ep("a"), ep("b")];
        let b = Balancer::new(fastrand::Rng::with_seed(9));
        let (first, load) = b.pick(&eps, &[]).unwrap();
        load.start().failure();
        for _ in 0..1000 {
            let (got, _) = b.pick(&eps, &[]).unwrap();
            assert_ne!(got.id, first.id, "the failed endpoint must not be chosen while penalised");
        }
        let (retry, _) = b.pick(&eps, std::slice::from_ref(&first.id)).unwrap();
        assert_ne!(retry.id, first.id);
    }

    #[test]
    fn nearest_tier_first_then_failover() {
        let ep = |id: &str, cluster: &str, zone: &str, healthy: bool| {
            Arc::new(Endpoint {
                id: id.into(),
                service: "web.default".parse().unwrap(),
                cluster: cluster.into(),
                zone: zone.into(),
                region: if cluster == "c" { "far".into() } else { "home".into() },
                gateways: Vec::new(),
                via_gateways: false,
                address: "127.0.0.1:1".into(),
                identity: None,
                healthy,
                weight: 1,
            })
        };
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let eps = vec![ep("remote", "b", "z1", true), ep("other-zone", "a", "z2", true), ep("near", "a", "z1", true)];
        for _ in 0..20 {
            assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "near");
        }
        // The near one failed this request: its cluster's other zone next, then the other cluster.
        assert_eq!(b.pick(&eps, &["near".into()]).unwrap().0.id, "other-zone");
        assert_eq!(b.pick(&eps, &["near".into(), "other-zone".into()]).unwrap().0.id, "remote");
        // Unhealthy local endpoints fail over to the remote cluster.
        let eps = vec![ep("remote", "b", "z1", true), ep("near", "a", "z1", false)];
        assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "remote");
    }

    #[test]
    fn other_clusters_of_the_region_come_before_other_regions() {
        let ep = |id: &str, cluster: &str, region: &str| {
            Arc::new(Endpoint {
                id: id.into(),
                service: "web.default".parse().unwrap(),
                cluster: cluster.into(),
                zone: "z1".into(),
                region: region.into(),
                gateways: Vec::new(),
                via_gateways: false,
                address: "127.0.0.1:1".into(),
                identity: None,
                healthy: true,
                weight: 1,
            })
        };
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let eps = vec![ep("far", "c", "eu"), ep("same-region", "b", "us"), ep("local", "a", "us")];
        let tried = ["local".to_string()];
        for _ in 0..20 {
            assert_eq!(b.pick_in(&eps, &tried, "us").unwrap().0.id, "same-region");
        }
        assert_eq!(b.pick_in(&eps, &["local".into(), "same-region".into()], "us").unwrap().0.id, "far");
        // Without a known region, every other cluster is one tier.
        let picked: std::collections::BTreeSet<String> =
            (0..200).map(|_| b.pick_in(&eps, &tried, "").unwrap().0.id.clone()).collect();
        assert_eq!(picked.len(), 2, "{picked:?}");
    }

    #[test]
    fn an_endpoint_that_keeps_failing_is_set_aside_and_the_next_tier_serves() {
        let ep = |id: &str, cluster: &str| {
            Arc::new(Endpoint {
                id: id.into(),
                service: "web.default".parse().unwrap(),
                cluster: cluster.into(),
                zone: "z1".into(),
                region: String::new(),
                gateways: Vec::new(),
                via_gateways: false,
                address: "127.0.0.1:1".into(),
                identity: None,
                healthy: true,
                weight: 1,
            })
        };
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let eps = vec![ep("near", "a"), ep("remote", "b")];
        for _ in 0..EJECT_AFTER {
            let (got, load) = b.pick(&eps, &[]).unwrap();
            assert_eq!(got.id, "near");
            load.start().failure();
        }
        assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "remote", "the failing endpoint is set aside");
        // With only the failing endpoint left, it is still used rather than failing outright.
        assert_eq!(b.pick(&eps[..1], &[]).unwrap().0.id, "near");
    }

    fn endpoint(id: &str, cluster: &str, address: &str, healthy: bool) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            id: id.into(),
            service: "api.default".parse().unwrap(),
            cluster: cluster.into(),
            zone: "z1".into(),
            region: "us".into(),
            gateways: Vec::new(),
            via_gateways: false,
            address: address.into(),
            identity: None,
            healthy,
            weight: 1,
        })
    }

    #[test]
    fn a_recovered_nearer_endpoint_takes_traffic_back_only_after_the_hold() {
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let remote = endpoint("b/1", "b", "10.0.2.1:1", true);
        // a's backend is down: b serves.
        let eps = vec![endpoint("a/1", "a", "10.0.1.1:1", false), remote.clone()];
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1");
        // It is healthy again: held while b can serve.
        let eps = vec![endpoint("a/1", "a", "10.0.1.1:1", true), remote.clone()];
        for _ in 0..20 {
            assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "failback waits for the hold");
        }
        // With b tried already, a's held endpoint serves rather than nothing.
        assert_eq!(b.pick_in(&eps, &["b/1".into()], "us").unwrap().0.id, "a/1");
        // The hold over, traffic returns.
        let load = b.state.lock().unwrap().loads.get("a/1").unwrap().clone();
        *load.held_until.lock().unwrap() = Some(Instant::now());
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "a/1");
    }

    #[test]
    fn new_endpoints_of_a_known_service_start_after_the_hold_but_not_the_first_ones() {
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let first = vec![endpoint("a/1", "a", "10.0.1.1:1", true)];
        assert_eq!(b.pick_in(&first, &[], "us").unwrap().0.id, "a/1");
        let more = vec![first[0].clone(), endpoint("a/2", "a", "10.0.1.2:1", true)];
        for _ in 0..20 {
            assert_eq!(b.pick_in(&more, &[], "us").unwrap().0.id, "a/1");
        }
        // A service seen for the first time: every endpoint serves at once.
        let fresh = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let picked: std::collections::BTreeSet<String> =
            (0..100).map(|_| fresh.pick_in(&more, &[], "us").unwrap().0.id.clone()).collect();
        assert_eq!(picked.len(), 2);
    }

    #[test]
    fn an_endpoint_at_a_new_address_starts_with_a_clean_record() {
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let eps = vec![endpoint("a/1", "a", "10.0.1.1:1", true), endpoint("b/1", "b", "10.0.2.1:1", true)];
        for _ in 0..EJECT_AFTER {
            let (got, load) = b.pick_in(&eps, &[], "us").unwrap();
            assert_eq!(got.id, "a/1");
            load.start().failure();
        }
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "ejected");
        // Restarted elsewhere: not ejected, held a moment, then serving.
        let moved = vec![endpoint("a/1", "a", "10.0.1.1:2", true), eps[1].clone()];
        assert_eq!(b.pick_in(&moved, &[], "us").unwrap().0.id, "b/1");
        let load = b.state.lock().unwrap().loads.get("a/1").unwrap().clone();
        assert!(!load.ejected(Instant::now()));
        *load.held_until.lock().unwrap() = None;
        assert_eq!(b.pick_in(&moved, &[], "us").unwrap().0.id, "a/1");
    }

    #[test]
    fn unreachable_endpoints_are_skipped_and_held_when_they_come_back() {
        let b = Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() });
        let eps = vec![endpoint("b/1", "b", "10.0.2.1:1", true), {
            let mut e = (*endpoint("c/1", "c", "10.0.3.1:1", true)).clone();
            e.region = "eu".into();
            Arc::new(e)
        }];
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "same region first");
        let no_b = |e: &Endpoint| e.cluster != "b";
        for _ in 0..20 {
            assert_eq!(b.pick_where(&eps, &|_| false, "us", &no_b).unwrap().0.id, "c/1");
        }
        assert!(b.pick_where(&eps[..1], &|_| false, "us", &no_b).is_none(), "never an unreachable endpoint");
        // b's gateway is back: b waits for the hold while c serves.
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "c/1");
    }
}
