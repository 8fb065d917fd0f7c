//! Evaluation metrics.

pub mod fd;
