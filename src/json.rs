//! Reading `config.json` files written by diffusers / transformers.

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use std::path::Path;

/// The diffusers version whose `save_config` output the configs this crate writes
/// follow key for key (`tests/pipeline_configs.rs`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Parse a JSON config, accepting the non-standard tokens Python's json module
/// writes (`Infinity`, `-Infinity`, `NaN`); they become null.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_json(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse_json(text: &str) -> Result<serde_json::Value> {
    // Replace bare Infinity / NaN tokens outside strings with null.
    let mut out = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let bytes: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == '"' {
            in_str = true;
            out.push(c);
            i += 1;
            continue;
        }
        let rest: String = bytes[i..bytes.len().min(i + 9)].iter().collect();
        if rest.starts_with("-Infinity") {
            out.push_str("null");
            i += 9;
        } else if rest.starts_with("Infinity") {
            out.push_str("null");
            i += 8;
        } else if rest.starts_with("NaN") {
            out.push_str("null");
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    Ok(serde_json::from_str(&out)?)
}

/// Read a config file into a typed struct; errors name the file and the field.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let v = read_json(path)?;
    serde_json::from_value(v).with_context(|| format!("{}: invalid config", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn accepts_python_json_tokens() {
        let v = parse_json(r#"{"a": -Infinity, "b": "NaN text", "c": NaN, "d": Infinity, "e": 1}"#)
            .unwrap();
        assert!(v["a"].is_null());
        assert_eq!(v["b"], "NaN text");
        assert!(v["c"].is_null() && v["d"].is_null());
        assert_eq!(v["e"], 1);
    }
}
