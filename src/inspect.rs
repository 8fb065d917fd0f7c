//! `adt inspect`: describe a diffusers pipeline folder or a single component folder
//! (components, configs, tensor counts and dtypes) by reading only file headers.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Summary of one safetensors file, from its header.
#[derive(Debug, Clone, Default)]
pub struct WeightsSummary {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    pub dtypes: BTreeMap<String, usize>,
}

pub fn summarize_safetensors(path: &Path) -> Result<WeightsSummary> {
    let v = crate::weights::read_header(path)?;
    let mut s = WeightsSummary::default();
    for (name, info) in &v {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?").to_string();
        let numel: u64 = info["shape"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d.as_u64()).product())
            .unwrap_or(0);
        let off = &info["data_offsets"];
        let bytes = off[1]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(off[0].as_u64().unwrap_or(0));
        s.tensors += 1;
        s.parameters += numel;
        s.bytes += bytes;
        *s.dtypes.entry(dtype).or_default() += 1;
    }
    Ok(s)
}

const KEY_FIELDS: &[&str] = &[
    "_class_name",
    "architectures",
    "model_type",
    "in_channels",
    "out_channels",
    "sample_size",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "attention_head_dim",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "use_linear_projection",
    "addition_embed_type",
    "latent_channels",
    "scaling_factor",
    "shift_factor",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "projection_dim",
    "vocab_size",
    "patch_size",
    "image_size",
    "num_layers",
    "joint_attention_dim",
    "prediction_type",
    "beta_schedule",
    "timestep_spacing",
    "shift",
    "torch_dtype",
    "dtype",
];

fn describe_component(dir: &Path, out: &mut String) -> Result<()> {
    let mut cfg_files: Vec<_> = [
        "config.json",
        "scheduler_config.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| dir.join(f))
    .filter(|p| p.is_file())
    .collect();
    cfg_files.truncate(1);
    for cfg in cfg_files {
        let v = crate::models::config::read_json(&cfg)?;
        for k in KEY_FIELDS {
            if let Some(x) = v.get(*k).filter(|x| !x.is_null()) {
                writeln!(out, "    {k}: {x}")?;
            }
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    for f in files {
        let s = summarize_safetensors(&f)?;
        let dtypes: Vec<String> = s.dtypes.iter().map(|(d, n)| format!("{d} x{n}")).collect();
        writeln!(
            out,
            "    weights {}: {} tensors, {:.2}M parameters, {:.1} MiB, dtypes {}",
            f.file_name().unwrap().to_string_lossy(),
            s.tensors,
            s.parameters as f64 / 1e6,
            s.bytes as f64 / (1024.0 * 1024.0),
            dtypes.join(", ")
        )?;
    }
    for extra in ["vocab.json", "merges.txt", "tokenizer.json", "spiece.model"] {
        if dir.join(extra).is_file() {
            writeln!(out, "    file {extra}")?;
        }
    }
    Ok(())
}

/// Text description of a pipeline folder (with model_index.json) or one component.
pub fn inspect(path: &Path) -> Result<String> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    let mut out = String::new();
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            bail!(
                "{}: expected a folder or a .safetensors file",
                path.display()
            );
        }
        let s = summarize_safetensors(path)?;
        writeln!(
            out,
            "{}: {} tensors, {:.2}M parameters, dtypes {:?}",
            path.display(),
            s.tensors,
            s.parameters as f64 / 1e6,
            s.dtypes
        )?;
        return Ok(out);
    }
    let index = path.join("model_index.json");
    if index.is_file() {
        let v = crate::models::config::read_json(&index)?;
        writeln!(
            out,
            "pipeline {} ({})",
            path.display(),
            v["_class_name"].as_str().unwrap_or("?")
        )?;
        let obj = v
            .as_object()
            .context("model_index.json: expected an object")?;
        for (name, spec) in obj {
            if name.starts_with('_') {
                continue;
            }
            if !spec.is_array() {
                continue;
            }
            let class = spec.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_str().unwrap_or("null").to_string())
                    .collect::<Vec<_>>()
                    .join(".")
            });
            match class {
                Some(c) if c != "null.null" => {
                    writeln!(out, "  {name}: {c}")?;
                    let d = path.join(name);
                    if d.is_dir() {
                        describe_component(&d, &mut out)?;
                    } else {
                        writeln!(out, "    (folder missing)")?;
                    }
                }
                _ => writeln!(out, "  {name}: (none)")?,
            }
        }
    } else {
        writeln!(out, "component {}", path.display())?;
        describe_component(path, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_a_component_folder() {
        let s = inspect(&crate::fixtures::dir("unet_sd15")).unwrap();
        assert!(s.contains("UNet2DConditionModel"), "{s}");
        assert!(s.contains("diffusion_pytorch_model.safetensors"), "{s}");
        assert!(s.contains("F32"), "{s}");
    }

    #[test]
    fn inspect_errors_name_the_path() {
        let e = inspect(Path::new("/nonexistent/pipeline"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/pipeline"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x00abc").unwrap();
        let e = inspect(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("corrupt"),
            "{e}"
        );
    }
}
