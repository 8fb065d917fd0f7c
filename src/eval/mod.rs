//! Evaluation metrics.

pub mod fd;
pub mod metrics;

pub use metrics::{evaluate, EvalOptions, EvalReport, FeatureSpace};
