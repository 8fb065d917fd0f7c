//! Config files of the model folders: JSON as diffusers and transformers write it (see
//! [`crate::json`], where the reader lives so that the schedule can use it too).
pub use crate::json::{parse_json, read_config, read_json};

/// The diffusers version whose `save_config` output the configs this crate writes
/// follow key for key (`tests/pipeline_configs.rs`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";
