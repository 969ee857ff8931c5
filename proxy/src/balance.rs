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

use crate::routes::{Endpoint, EndpointList, ServiceName};

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

/// Which endpoints this proxy can reach now, for a pick.
#[derive(Clone, Copy)]
pub struct Reach<'a> {
    /// Changes whenever an answer of `reachable` may have changed (a gateway went down or came
    /// back): see [`crate::gateways::GatewayHealth::generation`].
    pub generation: u64,
    /// False for an endpoint behind gateways that are all down.
    pub reachable: &'a dyn Fn(&Endpoint) -> bool,
}

fn everywhere(_: &Endpoint) -> bool {
    true
}

impl Reach<'static> {
    /// Every endpoint is reachable, always. Its generation is one that gateway health does not
    /// reach, so a balancer that is also given gateway health tells the two apart.
    pub fn everywhere() -> Self {
        Self { generation: u64::MAX, reachable: &everywhere }
    }
}

impl std::fmt::Debug for Reach<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reach").field("generation", &self.generation).finish_non_exhaustive()
    }
}

/// A tier with more endpoints than this is drawn from; a smaller one is looked at whole. Also the
/// most endpoints a pick draws before it looks at the whole tier.
const DRAWS: usize = 16;

/// Per-endpoint load state and the random source for choices.
///
/// A pick among a service's endpoints is power of two choices among the usable endpoints of the
/// nearest tier that has one (see [`Balancer::pick_where`] for which are usable). A pick looks
/// only at the nearest tiers: in a large tier it draws at random among the endpoints the
/// control plane calls healthy, skipping those it cannot use, until it has two (the same two a
/// look at every endpoint would have drawn, so the choice is the same); a small tier it looks
/// at whole. The cost follows the draws and the size of the nearest tier, not the size of the
/// service. When that cannot settle the choice (every usable endpoint of the nearest usable
/// tier has failed lately, or nothing can be used at all), the pick looks at every endpoint.
#[derive(Debug)]
pub struct Balancer {
    state: Mutex<State>,
    /// This proxy's place, for locality tiers.
    locality: Locality,
    /// Every pick looks at every endpoint (to compare, in tests).
    always_scan: bool,
}

#[derive(Debug)]
struct State {
    loads: HashMap<String, Arc<EndpointLoad>>,
    rng: fastrand::Rng,
    /// What a pick needs of each service's current endpoint list, by service.
    tables: HashMap<ServiceName, Table>,
    /// Work space of one scan, kept between picks so that a pick allocates nothing.
    candidates: Vec<Candidate>,
    slots: Vec<Slot>,
    /// Picks that looked at every endpoint.
    scans: u64,
}

/// One service's endpoint list with what a pick needs beside it, built when the list, the
/// region or the reachability of gateways changes.
#[derive(Debug)]
struct Table {
    list: EndpointList,
    region: String,
    generation: u64,
    /// The load of each endpoint of `list`, in its order.
    loads: Vec<Arc<EndpointLoad>>,
    /// The tier of each endpoint of `list`, in its order.
    tiers: Vec<u8>,
    /// Indices of the endpoints the control plane calls healthy, by tier (0 nearest).
    healthy_by_tier: [Vec<u32>; 4],
}

impl Table {
    fn fits(&self, list: &EndpointList, region: &str, generation: u64) -> bool {
        Arc::ptr_eq(&self.list, list) && self.generation == generation && self.region == region
    }

    fn build(
        list: &EndpointList,
        region: &str,
        reach: Reach<'_>,
        locality: &Locality,
        loads: &mut HashMap<String, Arc<EndpointLoad>>,
        now: Instant,
    ) -> Self {
        // A service this proxy already sends to: its new endpoints are held back a moment.
        let known = list.iter().any(|ep| loads.contains_key(ep.id.as_str()));
        let mut table = Table {
            list: list.clone(),
            region: region.to_owned(),
            generation: reach.generation,
            loads: Vec::with_capacity(list.len()),
            tiers: Vec::with_capacity(list.len()),
            healthy_by_tier: Default::default(),
        };
        for (i, ep) in list.iter().enumerate() {
            let load = match loads.get_mut(ep.id.as_str()) {
                Some(load) => {
                    if load.address != ep.address {
                        // A new instance at a new address: the old one's failures are not its own.
                        *load = Arc::new(EndpointLoad::new(now, ep, true));
                    }
                    load.clone()
                }
                None => {
                    let load = Arc::new(EndpointLoad::new(now, ep, known));
                    loads.insert(ep.id.clone(), load.clone());
                    load
                }
            };
            // Back to health, or reachable again (its gateway is back): held a moment. Health
            // changes come with a new list and reachability with a new generation, so every
            // change is seen here even by an endpoint that draws do not look at.
            load.observe_health(ep.healthy && (reach.reachable)(ep), now);
            let tier = locality.tier(ep, region);
            if ep.healthy
                && let Ok(i) = u32::try_from(i)
            {
                table.healthy_by_tier[usize::from(tier.min(3))].push(i);
            }
            table.loads.push(load);
            table.tiers.push(tier);
        }
        table
    }

    /// The choice a scan would make, looking only at the nearest tiers: `None` when that needs
    /// a look at every endpoint (the caller scans then).
    ///
    /// Tiers are taken nearest first, each with the endpoints the control plane calls healthy
    /// (a tier without any cannot serve). A large tier is drawn from; a small one, or a large
    /// one whose draws did not settle it, is looked at whole. A tier with nothing this pick
    /// can use passes to the next.
    fn nearest(
        &self,
        tried: &dyn Fn(&Endpoint) -> bool,
        reach: Reach<'_>,
        now: Instant,
        rng: &mut fastrand::Rng,
        candidates: &mut Vec<Candidate>,
    ) -> Option<usize> {
        for pool in self.healthy_by_tier.iter().filter(|t| !t.is_empty()) {
            if pool.len() > DRAWS
                && let Some(i) = self.drawn(pool, tried, reach, now, rng)
            {
                return Some(i);
            }
            candidates.clear();
            let (mut usable, mut clean) = (false, false);
            for &i in pool {
                let (ep, load) = (&self.list[i as usize], &self.loads[i as usize]);
                let reachable = (reach.reachable)(ep);
                load.observe_health(ep.healthy && reachable, now);
                let ok = reachable && !tried(ep) && !load.ejected(now);
                let held = load.held(now);
                usable |= ok;
                clean |= ok && !held && load.failures.load(Ordering::Relaxed) == 0;
                let mut candidate = load.candidate(ep, false, now);
                candidate.excluded = !ok || held;
                candidates.push(candidate);
            }
            if !usable {
                continue;
            }
            if !clean {
                // Whether held endpoints sit out depends on endpoints of other tiers.
                return None;
            }
            return choose(candidates, rng).map(|k| pool[k] as usize);
        }
        None
    }

    /// Draws the two endpoints of a power-of-two choice among `pool`'s usable ones that are not
    /// held (skipping the others), and chooses between them. `None` when the draws did not find
    /// two, or when the tier has no usable, unheld endpoint that has not failed lately (with
    /// one, held endpoints sit out, so skipping them was right; without, it depends on the
    /// other tiers).
    fn drawn(
        &self,
        pool: &[u32],
        tried: &dyn Fn(&Endpoint) -> bool,
        reach: Reach<'_>,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> Option<usize> {
        let mut found = [0usize; 2];
        let mut n = 0;
        let mut clean = false;
        for _ in 0..DRAWS {
            let i = pool[rng.usize(0..pool.len())] as usize;
            if n == 1 && i == found[0] {
                continue;
            }
            let (ep, load) = (&self.list[i], &self.loads[i]);
            let reachable = (reach.reachable)(ep);
            load.observe_health(ep.healthy && reachable, now);
            if !reachable || tried(ep) || load.ejected(now) || load.held(now) {
                continue;
            }
            clean |= load.failures.load(Ordering::Relaxed) == 0;
            found[n] = i;
            n += 1;
            if n == 2 {
                break;
            }
        }
        // Whether the pair stands must not depend on which pair was drawn: without a witness
        // in it, one is looked for in the whole tier.
        if n < 2 || !(clean || self.has_clean(pool, tried, reach, now)) {
            return None;
        }
        let pair = found.map(|i| self.loads[i].candidate(&self.list[i], false, now));
        choose(&pair, rng).map(|k| found[k])
    }

    /// Whether `pool` has a usable endpoint that is not held and has not failed lately.
    fn has_clean(&self, pool: &[u32], tried: &dyn Fn(&Endpoint) -> bool, reach: Reach<'_>, now: Instant) -> bool {
        pool.iter().any(|&i| {
            let (ep, load) = (&self.list[i as usize], &self.loads[i as usize]);
            load.failures.load(Ordering::Relaxed) == 0
                && (reach.reachable)(ep)
                && !tried(ep)
                && !load.ejected(now)
                && !load.held(now)
        })
    }

    /// Looks at every endpoint: the nearest tier with a usable endpoint, then a power-of-two
    /// choice among its usable endpoints.
    fn scan(
        &self,
        tried: &dyn Fn(&Endpoint) -> bool,
        reach: Reach<'_>,
        now: Instant,
        rng: &mut fastrand::Rng,
        candidates: &mut Vec<Candidate>,
        slots: &mut Vec<Slot>,
    ) -> Option<usize> {
        candidates.clear();
        slots.clear();
        for ((ep, load), &tier) in self.list.iter().zip(&self.loads).zip(&self.tiers) {
            let reachable = (reach.reachable)(ep);
            load.observe_health(ep.healthy && reachable, now);
            let mut candidate = load.candidate(ep, tried(ep), now);
            candidate.excluded |= !reachable;
            candidates.push(candidate);
            slots.push(Slot {
                reachable,
                held: load.held(now),
                clean: load.failures.load(Ordering::Relaxed) == 0,
                tier,
            });
        }
        if !candidates.iter().any(|c| c.healthy && !c.excluded) {
            // Everything usable is set aside: trust the control plane's health rather than fail.
            for ((c, ep), slot) in candidates.iter_mut().zip(self.list.iter()).zip(slots.iter()) {
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
        choose(candidates, rng)
    }
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
        let state = State {
            loads: HashMap::new(),
            rng,
            tables: HashMap::new(),
            candidates: Vec::new(),
            slots: Vec::new(),
            scans: 0,
        };
        Self { state: Mutex::new(state), locality: Locality::default(), always_scan: false }
    }

    /// This balancer, looking at every endpoint on every pick when `always` (to compare).
    #[cfg(test)]
    fn scanning(self, always: bool) -> Self {
        Self { always_scan: always, ..self }
    }

    /// A balancer that prefers endpoints near `locality`.
    pub fn with_locality(locality: Locality) -> Self {
        Self { locality, ..Self::default() }
    }

    /// Picks one of `endpoints`, skipping those whose id is in `tried`.
    pub fn pick(&self, endpoints: &EndpointList, tried: &[String]) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        self.pick_in(endpoints, tried, "")
    }

    /// As [`Balancer::pick`], for a proxy whose cluster is in `region`: other clusters of that
    /// region come before the rest.
    pub fn pick_in(
        &self,
        endpoints: &EndpointList,
        tried: &[String],
        region: &str,
    ) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        self.pick_where(endpoints, &|ep| tried.contains(&ep.id), region, Reach::everywhere())
    }

    /// As [`Balancer::pick_in`], skipping the endpoints `tried` says this request already tried,
    /// among the endpoints this proxy can reach now. An endpoint is usable when the control
    /// plane calls it healthy, it is reachable, not tried, and not set aside for failing; one
    /// held back (new, or just back) sits out while another usable one has not failed lately.
    /// When nothing is usable, an endpoint set aside for failing is used rather than none.
    ///
    /// All `endpoints` are of one service. Allocates nothing once the list has been seen.
    pub fn pick_where(
        &self,
        endpoints: &EndpointList,
        tried: &dyn Fn(&Endpoint) -> bool,
        region: &str,
        reach: Reach<'_>,
    ) -> Option<(Arc<Endpoint>, Arc<EndpointLoad>)> {
        let service = &endpoints.first()?.service;
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { loads, rng, tables, candidates, slots, .. } = &mut *state;
        if !tables.get(service).is_some_and(|t| t.fits(endpoints, region, reach.generation)) {
            let table = Table::build(endpoints, region, reach, &self.locality, loads, now);
            tables.insert(service.clone(), table);
        }
        let table = tables.get(service)?;
        let drawn = if self.always_scan { None } else { table.nearest(tried, reach, now, rng, candidates) };
        let (i, scanned) = match drawn {
            Some(i) => (Some(i), false),
            None => (table.scan(tried, reach, now, rng, candidates, slots), true),
        };
        let picked = i.map(|i| (endpoints[i].clone(), table.loads[i].clone()));
        state.scans += u64::from(scanned);
        picked
    }

    /// The tier of `ep` for this proxy, in `region` (see [`Locality::tier`]).
    pub fn tier(&self, ep: &Endpoint, region: &str) -> u8 {
        self.locality.tier(ep, region)
    }

    /// Forgets endpoints that are no longer known, and the lists that held them.
    pub fn retain(&self, live: &dyn Fn(&str) -> bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.loads.retain(|id, _| live(id));
        state.tables.retain(|_, t| t.list.iter().all(|ep| live(&ep.id)));
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

    /// The behaviour tests below run twice: picks that look at every endpoint, and picks that
    /// look at the nearest tiers (as in use), which must behave the same.
    macro_rules! scanned_and_drawn {
        ($($name:ident),* $(,)?) => {
            mod scanned {
                $(#[test]
                fn $name() {
                    super::$name(true)
                })*
            }
            mod nearest_tiers {
                $(#[test]
                fn $name() {
                    super::$name(false)
                })*
            }
        };
    }

    scanned_and_drawn!(
        balancer_moves_away_from_failures,
        nearest_tier_first_then_failover,
        other_clusters_of_the_region_come_before_other_regions,
        an_endpoint_that_keeps_failing_is_set_aside_and_the_next_tier_serves,
        a_recovered_nearer_endpoint_takes_traffic_back_only_after_the_hold,
        new_endpoints_of_a_known_service_start_after_the_hold_but_not_the_first_ones,
        an_endpoint_at_a_new_address_starts_with_a_clean_record,
        unreachable_endpoints_are_skipped_and_held_when_they_come_back,
    );

    fn near_a(scan_all: bool) -> Balancer {
        Balancer::with_locality(Locality { cluster: "a".into(), zone: "z1".into() }).scanning(scan_all)
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

    fn balancer_moves_away_from_failures(scan_all: bool) {
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
        let eps: EndpointList = vec![ep("a"), ep("b")].into();
        let b = Balancer::new(fastrand::Rng::with_seed(9)).scanning(scan_all);
        let (first, load) = b.pick(&eps, &[]).unwrap();
        load.start().failure();
        for _ in 0..1000 {
            let (got, _) = b.pick(&eps, &[]).unwrap();
            assert_ne!(got.id, first.id, "the failed endpoint must not be chosen while penalised");
        }
        let (retry, _) = b.pick(&eps, std::slice::from_ref(&first.id)).unwrap();
        assert_ne!(retry.id, first.id);
    }

    fn nearest_tier_first_then_failover(scan_all: bool) {
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
        let b = near_a(scan_all);
        let eps: EndpointList =
            vec![ep("remote", "b", "z1", true), ep("other-zone", "a", "z2", true), ep("near", "a", "z1", true)].into();
        for _ in 0..20 {
            assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "near");
        }
        // The near one failed this request: its cluster's other zone next, then the other cluster.
        assert_eq!(b.pick(&eps, &["near".into()]).unwrap().0.id, "other-zone");
        assert_eq!(b.pick(&eps, &["near".into(), "other-zone".into()]).unwrap().0.id, "remote");
        // Unhealthy local endpoints fail over to the remote cluster.
        let eps: EndpointList = vec![ep("remote", "b", "z1", true), ep("near", "a", "z1", false)].into();
        assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "remote");
    }

    fn other_clusters_of_the_region_come_before_other_regions(scan_all: bool) {
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
        let b = near_a(scan_all);
        let eps: EndpointList = vec![ep("far", "c", "eu"), ep("same-region", "b", "us"), ep("local", "a", "us")].into();
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

    fn an_endpoint_that_keeps_failing_is_set_aside_and_the_next_tier_serves(scan_all: bool) {
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
        let b = near_a(scan_all);
        let eps: EndpointList = vec![ep("near", "a"), ep("remote", "b")].into();
        for _ in 0..EJECT_AFTER {
            let (got, load) = b.pick(&eps, &[]).unwrap();
            assert_eq!(got.id, "near");
            load.start().failure();
        }
        assert_eq!(b.pick(&eps, &[]).unwrap().0.id, "remote", "the failing endpoint is set aside");
        // With only the failing endpoint left, it is still used rather than failing outright.
        assert_eq!(b.pick(&EndpointList::from(&eps[..1]), &[]).unwrap().0.id, "near");
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

    fn a_recovered_nearer_endpoint_takes_traffic_back_only_after_the_hold(scan_all: bool) {
        let b = near_a(scan_all);
        let remote = endpoint("b/1", "b", "10.0.2.1:1", true);
        // a's backend is down: b serves.
        let eps: EndpointList = vec![endpoint("a/1", "a", "10.0.1.1:1", false), remote.clone()].into();
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1");
        // It is healthy again: held while b can serve.
        let eps: EndpointList = vec![endpoint("a/1", "a", "10.0.1.1:1", true), remote.clone()].into();
        for _ in 0..20 {
            assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "failback waits for the hold");
        }
        // With b tried already, a's held endpoint serves rather than nothing.
        assert_eq!(b.pick_in(&eps, &["b/1".into()], "us").unwrap().0.id, "a/1");
        // The hold over, traffic returns.
        let load = load_of(&b, "a/1");
        *load.held_until.lock().unwrap() = Some(Instant::now());
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "a/1");
    }

    fn new_endpoints_of_a_known_service_start_after_the_hold_but_not_the_first_ones(scan_all: bool) {
        let b = near_a(scan_all);
        let first: EndpointList = vec![endpoint("a/1", "a", "10.0.1.1:1", true)].into();
        assert_eq!(b.pick_in(&first, &[], "us").unwrap().0.id, "a/1");
        let more: EndpointList = vec![first[0].clone(), endpoint("a/2", "a", "10.0.1.2:1", true)].into();
        for _ in 0..20 {
            assert_eq!(b.pick_in(&more, &[], "us").unwrap().0.id, "a/1");
        }
        // A service seen for the first time: every endpoint serves at once.
        let fresh = near_a(scan_all);
        let picked: std::collections::BTreeSet<String> =
            (0..100).map(|_| fresh.pick_in(&more, &[], "us").unwrap().0.id.clone()).collect();
        assert_eq!(picked.len(), 2);
    }

    fn an_endpoint_at_a_new_address_starts_with_a_clean_record(scan_all: bool) {
        let b = near_a(scan_all);
        let eps: EndpointList =
            vec![endpoint("a/1", "a", "10.0.1.1:1", true), endpoint("b/1", "b", "10.0.2.1:1", true)].into();
        for _ in 0..EJECT_AFTER {
            let (got, load) = b.pick_in(&eps, &[], "us").unwrap();
            assert_eq!(got.id, "a/1");
            load.start().failure();
        }
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "ejected");
        // Restarted elsewhere: not ejected, held a moment, then serving.
        let moved: EndpointList = vec![endpoint("a/1", "a", "10.0.1.1:2", true), eps[1].clone()].into();
        assert_eq!(b.pick_in(&moved, &[], "us").unwrap().0.id, "b/1");
        let load = load_of(&b, "a/1");
        assert!(!load.ejected(Instant::now()));
        *load.held_until.lock().unwrap() = None;
        assert_eq!(b.pick_in(&moved, &[], "us").unwrap().0.id, "a/1");
    }

    fn unreachable_endpoints_are_skipped_and_held_when_they_come_back(scan_all: bool) {
        let b = near_a(scan_all);
        let eps: EndpointList = vec![endpoint("b/1", "b", "10.0.2.1:1", true), {
            let mut e = (*endpoint("c/1", "c", "10.0.3.1:1", true)).clone();
            e.region = "eu".into();
            Arc::new(e)
        }]
        .into();
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "b/1", "same region first");
        let no_b = |e: &Endpoint| e.cluster != "b";
        let without_b = Reach { generation: 1, reachable: &no_b };
        for _ in 0..20 {
            assert_eq!(b.pick_where(&eps, &|_| false, "us", without_b).unwrap().0.id, "c/1");
        }
        assert!(
            b.pick_where(&EndpointList::from(&eps[..1]), &|_| false, "us", without_b).is_none(),
            "never an unreachable endpoint"
        );
        // b's gateway is back: b waits for the hold while c serves.
        assert_eq!(b.pick_in(&eps, &[], "us").unwrap().0.id, "c/1");
    }

    /// A service of 1,000 endpoints: `near` of them in this proxy's zone, the rest in other
    /// clusters of the region ("b") and beyond ("c").
    fn large(near: usize, healthy_near: bool) -> EndpointList {
        service_of(1_000, near, healthy_near)
    }

    /// A service of `n` endpoints laid out as [`large`]'s.
    fn service_of(n: usize, near: usize, healthy_near: bool) -> EndpointList {
        (0..n)
            .map(|i| {
                let (cluster, region) = match i {
                    i if i < near => ("a", "us"),
                    i if i % 2 == 0 => ("b", "us"),
                    _ => ("c", "eu"),
                };
                Arc::new(Endpoint {
                    id: format!("{cluster}/{i}"),
                    service: "api.default".parse().unwrap(),
                    cluster: cluster.into(),
                    zone: "z1".into(),
                    region: region.into(),
                    gateways: if cluster == "a" { Vec::new() } else { vec![format!("gw-{cluster}")] },
                    via_gateways: cluster != "a",
                    address: format!("10.0.{}.{}:1", i / 250, i % 250),
                    identity: None,
                    healthy: cluster != "a" || healthy_near,
                    weight: 1,
                })
            })
            .collect()
    }

    fn load_of(b: &Balancer, id: &str) -> Arc<EndpointLoad> {
        b.state.lock().unwrap().loads.get(id).unwrap().clone()
    }

    fn scans(b: &Balancer) -> u64 {
        b.state.lock().unwrap().scans
    }

    #[test]
    fn a_large_service_is_drawn_from_evenly_in_the_nearest_tier_without_scanning() {
        let b = near_a(false);
        let eps = large(100, true);
        let mut counts = HashMap::<String, u32>::new();
        // No samples: every endpoint keeps the same estimate, so the choice is even.
        for _ in 0..20_000 {
            let (ep, _) = b.pick_in(&eps, &[], "us").unwrap();
            *counts.entry(ep.id.clone()).or_default() += 1;
        }
        assert_eq!(scans(&b), 0, "every pick settled by its draws");
        assert_eq!(counts.len(), 100, "only the 100 endpoints of this zone, each of them");
        assert!(counts.keys().all(|id| id.starts_with("a/")));
        // About 200 each.
        let (lo, hi) = (counts.values().min().unwrap(), counts.values().max().unwrap());
        assert!(*lo >= 100 && *hi <= 320, "spread {lo}..{hi}");
        // A retry skips the endpoint it tried.
        let tried: Vec<String> = (0..99).map(|i| format!("a/{i}")).collect();
        for _ in 0..20 {
            assert_eq!(b.pick_in(&eps, &tried, "us").unwrap().0.id, "a/99");
        }
    }

    #[test]
    fn drawing_chooses_as_scanning_does() {
        // 64 endpoints of one zone in four groups of latency: each group's share of the picks
        // is the same whether the picks scan or draw.
        let eps = service_of(128, 64, true);
        let shares = |scan_all: bool| {
            let b = near_a(scan_all);
            b.pick_in(&eps, &[], "us").unwrap();
            for (i, ep) in eps.iter().take(64).enumerate() {
                load_of(&b, &ep.id).record(Duration::from_millis([1, 2, 5, 20][i % 4]));
            }
            let mut groups = [0u32; 4];
            for _ in 0..40_000 {
                let (ep, _) = b.pick_in(&eps, &[], "us").unwrap();
                let i: usize = ep.id.trim_start_matches("a/").parse().unwrap();
                groups[i % 4] += 1;
            }
            (groups.map(|g| f64::from(g) / 40_000.0), scans(&b))
        };
        let (scanned, scans_when_scanning) = shares(true);
        let (drawn, scans_when_drawing) = shares(false);
        assert_eq!(scans_when_drawing, 0);
        assert!(scans_when_scanning >= 40_000);
        // Power of two choices: the fastest group wins unless both draws are slower, so the
        // shares fall steeply; the slowest group is picked only against itself.
        assert!(scanned[0] > 0.4 && scanned[3] < 0.1, "{scanned:?}");
        for (s, d) in scanned.iter().zip(&drawn) {
            assert!((s - d).abs() < 0.02, "scanned {scanned:?}, drawn {drawn:?}");
        }
    }

    #[test]
    fn drawing_chooses_as_scanning_does_when_most_endpoints_failed_lately() {
        // 40 endpoints of one zone, 36 of them with a failure since their last success: a pick
        // takes a clean one only when one is among its two draws, whether it scans or draws.
        let eps = service_of(80, 40, true);
        let share = |scan_all: bool| {
            let b = near_a(scan_all);
            b.pick_in(&eps, &[], "us").unwrap();
            for ep in eps.iter().take(36) {
                load_of(&b, &ep.id).start().failure();
            }
            let clean = (0..40_000)
                .filter(|_| {
                    let id = b.pick_in(&eps, &[], "us").unwrap().0.id.clone();
                    id.trim_start_matches("a/").parse::<usize>().unwrap() >= 36
                })
                .count();
            clean as f64 / 40_000.0
        };
        // 1 - (36 * 35) / (40 * 39)
        let want = 1.0 - 1260.0 / 1560.0;
        let (scanned, drawn) = (share(true), share(false));
        assert!((scanned - want).abs() < 0.02, "scanned {scanned}, want {want}");
        assert!((drawn - want).abs() < 0.02, "drawn {drawn}, want {want}");
    }

    #[test]
    fn a_small_nearest_tier_of_a_large_service_is_looked_at_whole() {
        let b = near_a(false);
        let eps = large(3, true);
        let mut picked = std::collections::BTreeSet::new();
        for _ in 0..300 {
            picked.insert(b.pick_in(&eps, &[], "us").unwrap().0.id.clone());
        }
        assert_eq!(picked, ["a/0", "a/1", "a/2"].map(String::from).into());
        // Two of them tried: the third, then the next tier.
        assert_eq!(b.pick_in(&eps, &["a/0".into(), "a/1".into()], "us").unwrap().0.id, "a/2");
        let all: Vec<String> = (0..3).map(|i| format!("a/{i}")).collect();
        assert_eq!(b.pick_in(&eps, &all, "us").unwrap().0.cluster, "b");
        assert_eq!(scans(&b), 0);
    }

    #[test]
    fn a_large_service_whose_zone_is_down_is_drawn_from_in_the_region_without_scanning() {
        let b = near_a(false);
        let eps = large(100, false);
        for _ in 0..2_000 {
            let (ep, load) = b.pick_in(&eps, &[], "us").unwrap();
            assert_eq!(ep.cluster, "b");
            load.start().success();
        }
        assert_eq!(scans(&b), 0);
    }

    #[test]
    fn a_large_service_behind_a_gateway_that_goes_down_and_comes_back() {
        let b = near_a(false);
        let eps = large(0, true);
        let no_b = |e: &Endpoint| e.cluster != "b";
        let down = Reach { generation: 1, reachable: &no_b };
        let up = Reach { generation: 2, reachable: &everywhere };
        assert_eq!(b.pick_where(&eps, &|_| false, "us", Reach { generation: 0, ..up }).unwrap().0.cluster, "b");
        // b's gateway is down: c serves, and b's tier is passed over without a look at c's.
        let before = scans(&b);
        for _ in 0..50 {
            assert_eq!(b.pick_where(&eps, &|_| false, "us", down).unwrap().0.cluster, "c");
        }
        assert_eq!(scans(&b), before);
        // Back: all of b's endpoints were seen to go and come back, even those never drawn, so
        // they are held while c serves.
        for _ in 0..50 {
            assert_eq!(b.pick_where(&eps, &|_| false, "us", up).unwrap().0.cluster, "c", "b waits for the hold");
        }
        let loads: Vec<_> = b.state.lock().unwrap().loads.values().cloned().collect();
        for load in loads {
            *load.held_until.lock().unwrap() = None;
        }
        let before = scans(&b);
        for _ in 0..50 {
            assert_eq!(b.pick_where(&eps, &|_| false, "us", up).unwrap().0.cluster, "b");
        }
        assert_eq!(scans(&b), before, "drawn again once b serves");
    }
}
