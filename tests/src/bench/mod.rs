//! `trellis-bench`: scenarios that measure the mesh side by side with the direct path (the
//! physical limit) and a peer proxy doing the same hops, alternating in one invocation so ratios
//! hold on a noisy machine. Each figure is printed as one JSON object per line.

pub mod haproxy;
pub mod load;
pub mod procstat;
pub mod relay;
pub mod report;
pub mod scenarios;
pub mod upstream;
