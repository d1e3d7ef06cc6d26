//! Parasync: a parameter server and collectives for distributed training.
//!
//! This root crate carries the `parasync` command line (every role as a subcommand, so one
//! binary starts a whole local cluster), the `demo` job, and helpers shared by the
//! end-to-end tests and benchmarks. The pieces live in their own crates:
//! `ps-server` (the daemon), `client` (what a trainer calls), `proto`, `tensor`.

pub mod certs;
pub mod cluster;
pub mod ctr;
pub mod demo;
pub mod model;
pub mod netbench;
pub mod netlab;
pub mod soak;
pub mod sparsebench;
pub mod stalebench;
pub mod svgplot;
