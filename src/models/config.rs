//! Config files of the model folders: JSON as diffusers and transformers write it (see
//! [`crate::json`], where the reader lives so that the schedule can use it too).
pub use crate::json::{parse_json, read_config, read_json, DIFFUSERS_VERSION};
