//! Helpers of the parity tests against the reference outputs in `tests/fixtures/`
//! (tiny random-weight checkpoints saved by diffusers / transformers, with the
//! inputs and outputs those libraries computed). Shared by the integration tests
//! (`mod common;`) and the library's unit tests (included by path, test builds only).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// `tests/fixtures` of this repository.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// One fixture folder, e.g. `dir("unet_sd15")` or `dir("schedulers/ddim_eps")`.
pub fn dir(name: &str) -> PathBuf {
    root().join(name)
}

/// All tensors of a fixture's `io.safetensors`, by name.
pub fn io(name: &str) -> Result<HashMap<String, Tensor>> {
    load_map(&dir(name).join("io.safetensors"))
}

/// All tensors of a safetensors file, by name.
pub fn load_map(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {}", path.display()))?
        .into_iter()
        .collect())
}

/// A fixture's `case.json`.
pub fn case(name: &str) -> Result<serde_json::Value> {
    let p = dir(name).join("case.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// `max|ours - reference| / max|reference|`, computed in float64.
pub fn max_rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(
        ours.size(),
        reference.size(),
        "shape mismatch: ours {:?} vs reference {:?}",
        ours.size(),
        reference.size()
    );
    let a = ours.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu);
    let b = reference
        .to_kind(tch::Kind::Double)
        .to_device(tch::Device::Cpu);
    let num = (a - &b).abs().max().double_value(&[]);
    let den = b.abs().max().double_value(&[]);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}
