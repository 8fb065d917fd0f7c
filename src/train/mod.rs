//! Training: Algorithm 1 of the paper, the FT baseline, checkpoints.
pub mod adt;
pub mod checkpoint;
pub mod config;
pub mod ddp;
pub mod fast;
pub mod logging;
pub mod optim;
pub mod path;
pub mod quant8;
pub mod run;
