//! The multi-process harness of Trellis and the `trellis-bench` runner. The harness runs the real
//! `trellis-cp`, `trellis-proxy` and `trellis` binaries, each cluster on its own loopback block
//! (cluster A on 127.0.1.x, B on 127.0.2.x, ...), waits on conditions with deadlines and kills
//! every process it started when the test ends, also on panic.

pub mod bench;
pub mod group;
pub mod harness;
pub mod mesh;
pub mod netns;
pub mod world;
