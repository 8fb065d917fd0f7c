//! adt: Adversarial Diffusion Tuning for Stable Diffusion models, on libtorch.
pub mod bench;
pub mod data;
pub mod demo;
pub mod demo_data;
pub mod disc;
pub mod dist;
pub mod eval;
pub mod inspect;
pub mod json;
pub mod models;
pub mod progress;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod train;
pub mod weights;

/// The parity-test helpers of `tests/common/fixtures.rs`, for the unit tests (not part
/// of the library).
#[cfg(test)]
#[path = "../tests/common/fixtures.rs"]
mod fixtures;
