//! Jittered exponential backoff for reconnects and retries of control-plane calls.
//!
//! Full jitter (a uniform delay between half the current step and the step) keeps a fleet of
//! proxies that lost the same control plane from reconnecting in lockstep.

use std::time::Duration;

/// An exponential backoff between `min` and `max`, doubled after each failure.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff starting at `min` and capped at `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), step: min, rng: fastrand::Rng::new() }
    }

    /// A backoff with a seeded random source (tests).
    pub fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Self { rng, ..Self::new(min, max) }
    }

    /// The next delay to wait; grows the step for the following one.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from((step - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(self.rng.u64(0..=spread))
    }

    /// Back to the smallest step, after a success.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::with_rng(Duration::from_millis(100), Duration::from_secs(5), fastrand::Rng::with_seed(7));
        let steps = [100u64, 200, 400, 800, 1600, 3200, 5000, 5000];
        for want in steps {
            let got = b.next_delay().as_millis() as u64;
            assert!(got >= want / 2 && got <= want, "delay {got} ms outside [{}, {want}]", want / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
