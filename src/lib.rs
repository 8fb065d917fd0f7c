//! adt: Adversarial Diffusion Tuning for Stable Diffusion models, on libtorch.
pub mod bench;
pub mod data;
pub mod demo;
pub mod disc;
pub mod eval;
pub mod fixtures;
pub mod inspect;
pub mod json;
pub mod models;
pub mod report;
pub mod sample;
pub mod schedule;
pub mod train;
pub mod weights;
