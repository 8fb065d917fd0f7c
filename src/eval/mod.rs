//! Evaluation metrics.

pub mod clip_score;
pub mod fd;
pub mod metrics;

pub use metrics::{evaluate, EvalOptions, EvalReport, FeatureSpace};
