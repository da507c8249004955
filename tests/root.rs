//! Spotlight's integration tests: one crate, one root file that pulls in every module
//! (as wgpu's own `tests/` crate does). GPU tests share two engines per process (`common::engine`).

#[macro_use]
mod common;

mod bad_input;
mod decode;
mod engine;
mod hardening;
mod layer;
mod lens;
mod limits;

mod backward;
mod differential;
mod edge_cases;
mod shaders;

mod coop;
