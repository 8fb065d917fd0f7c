//! Training: Algorithm 1 of the paper, the FT baseline, checkpoints.
pub mod config;
pub mod optim;
pub mod path;
pub mod logging;
