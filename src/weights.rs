//! Reading and writing safetensors weights with strict name / shape checking.
//!
//! Models are built on a `tch::nn::VarStore` whose variable names follow the
//! diffusers / transformers naming (`down_blocks.0.resnets.1.conv1.weight`). Loading
//! checks every variable against the files: a missing tensor, an unexpected tensor
//! or a shape mismatch is an error naming the file, the tensor, expected and found.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Convert a safetensors dtype to a tch Kind.
fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    use safetensors::Dtype as D;
    Some(match dtype {
        D::F32 => Kind::Float,
        D::F16 => Kind::Half,
        D::BF16 => Kind::BFloat16,
        D::F64 => Kind::Double,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::I16 => Kind::Int16,
        D::I8 => Kind::Int8,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<safetensors::Dtype> {
    use safetensors::Dtype as D;
    Ok(match kind {
        Kind::Float => D::F32,
        Kind::Half => D::F16,
        Kind::BFloat16 => D::BF16,
        Kind::Double => D::F64,
        Kind::Int64 => D::I64,
        Kind::Int => D::I32,
        Kind::Int16 => D::I16,
        Kind::Int8 => D::I8,
        Kind::Uint8 => D::U8,
        Kind::Bool => D::BOOL,
        k => bail!("cannot store tensors of kind {k:?} in safetensors"),
    })
}

/// The JSON header of a safetensors file (tensor names -> dtype, shape, offsets),
/// read without loading the data.
pub fn read_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .with_context(|| format!("{}: too short for a safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    let size = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if n > 100_000_000 || n + 8 > size {
        bail!(
            "{}: corrupt safetensors header (header length {n}, file size {size})",
            path.display()
        );
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: reading safetensors header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .with_context(|| format!("{}: safetensors header is not valid JSON", path.display()))?;
    let m = match v {
        serde_json::Value::Object(m) => m,
        _ => bail!("{}: safetensors header is not an object", path.display()),
    };
    check_header(&m, size - 8 - n).with_context(|| format!("{}", path.display()))?;
    Ok(m)
}

/// Bytes per element of a safetensors dtype name.
fn dtype_size(name: &str) -> Option<u64> {
    Some(match name {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// Check a parsed safetensors header against the size of the data that follows
/// it: every tensor has a known dtype, a shape, and data offsets that lie inside
/// the data and match its byte size (a truncated file fails here).
pub fn check_header(
    header: &serde_json::Map<String, serde_json::Value>,
    data_len: u64,
) -> Result<()> {
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for (name, v) in header {
        if name == "__metadata__" {
            continue;
        }
        let o = v
            .as_object()
            .with_context(|| format!("tensor {name}: header entry is not an object"))?;
        let dtype = o
            .get("dtype")
            .and_then(|d| d.as_str())
            .with_context(|| format!("tensor {name}: no dtype"))?;
        let size =
            dtype_size(dtype).with_context(|| format!("tensor {name}: unknown dtype {dtype:?}"))?;
        let shape = o
            .get("shape")
            .and_then(|s| s.as_array())
            .with_context(|| format!("tensor {name}: no shape"))?;
        let mut numel: u64 = 1;
        for d in shape {
            let d = d.as_u64().with_context(|| {
                format!("tensor {name}: shape {shape:?} is not a list of sizes")
            })?;
            numel = numel
                .checked_mul(d)
                .with_context(|| format!("tensor {name}: shape {shape:?} overflows"))?;
        }
        let offs = o
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .with_context(|| format!("tensor {name}: no data_offsets [begin, end]"))?;
        let (Some(b), Some(e)) = (offs[0].as_u64(), offs[1].as_u64()) else {
            bail!("tensor {name}: data_offsets {offs:?} are not byte offsets");
        };
        if b > e || e > data_len {
            bail!(
                "tensor {name}: data_offsets [{b}, {e}] do not fit the {data_len} bytes of data (truncated or corrupt file)"
            );
        }
        let want = numel.checked_mul(size);
        if want != Some(e - b) {
            bail!(
                "tensor {name}: {dtype} {shape:?} needs {} bytes but data_offsets [{b}, {e}] hold {}",
                want.map(|w| w.to_string()).unwrap_or_else(|| "too many".into()),
                e - b
            );
        }
        spans.push((b, e, name));
    }
    // The data regions tile the data exactly, as the format requires.
    spans.sort();
    let mut at = 0;
    for (b, e, name) in spans {
        if b != at {
            bail!(
                "tensor {name}: data_offsets start at {b}, expected {at} (overlapping tensors or a gap in the data)"
            );
        }
        at = e;
    }
    if at != data_len {
        bail!("the tensors' data_offsets end at {at} but the file holds {data_len} bytes of data");
    }
    Ok(())
}

/// Parse the header of an in-memory safetensors file and check its offsets (see
/// [`check_header`]); never panics on any input.
pub fn header_from_bytes(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>> {
    if bytes.len() < 8 {
        bail!("too short for a safetensors file ({} bytes)", bytes.len());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into()?);
    let size = bytes.len() as u64;
    if n > 100_000_000 || n + 8 > size {
        bail!("corrupt safetensors header (header length {n}, file size {size})");
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .context("safetensors header is not valid JSON")?;
    let serde_json::Value::Object(m) = v else {
        bail!("safetensors header is not an object");
    };
    check_header(&m, size - 8 - n)?;
    Ok(m)
}

/// Names of the tensors in a safetensors file, from its header only.
pub fn tensor_names(path: &Path) -> Result<Vec<String>> {
    Ok(read_header(path)?
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect())
}

/// Parse a safetensors buffer into named CPU tensors (copied out of the buffer).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_safetensors(&bytes)
        .with_context(|| format!("parsing safetensors file {}", path.display()))
}

pub fn parse_safetensors(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name)?;
        let kind = kind_of(view.dtype())
            .with_context(|| format!("tensor {name}: unsupported dtype {:?}", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("tensor {name}: bad data"))?;
        out.push((name, t));
    }
    Ok(out)
}

/// Read several safetensors files into one map, as sharded checkpoints are laid out.
pub fn read_many(paths: &[PathBuf]) -> Result<BTreeMap<String, (Tensor, PathBuf)>> {
    let mut map = BTreeMap::new();
    for p in paths {
        for (name, t) in read_safetensors(p)? {
            if let Some((_, prev)) = map.insert(name.clone(), (t, p.clone())) {
                bail!(
                    "tensor {name} appears in both {} and {}",
                    prev.display(),
                    p.display()
                );
            }
        }
    }
    Ok(map)
}

/// Options for [`load_into`].
#[derive(Default, Clone)]
pub struct LoadOptions {
    /// Tensor names in the file that the model does not use and may be ignored
    /// (exact names, or prefixes ending in '.'; a leading '*' matches a suffix).
    pub ignore: Vec<String>,
    /// Renames applied to file names before matching: (from_prefix, to_prefix).
    pub rename: Vec<(String, String)>,
}

fn ignored(name: &str, ignore: &[String]) -> bool {
    ignore.iter().any(|pat| {
        if let Some(suffix) = pat.strip_prefix('*') {
            name.ends_with(suffix)
        } else if pat.ends_with('.') {
            name.starts_with(pat.as_str())
        } else {
            name == pat
        }
    })
}

/// Copy the tensors of `paths` into the variables of `vs`. Every variable must be
/// found with the same shape; every tensor in the files must be used unless ignored.
/// Values are converted to each variable's kind.
pub fn load_into(vs: &mut VarStore, paths: &[PathBuf], opts: &LoadOptions) -> Result<()> {
    let file_list = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut tensors = read_many(paths)?;
    // Apply renames.
    if !opts.rename.is_empty() {
        let mut renamed = BTreeMap::new();
        for (name, v) in std::mem::take(&mut tensors) {
            let mut new = name.clone();
            for (from, to) in &opts.rename {
                if let Some(rest) = name.strip_prefix(from.as_str()) {
                    new = format!("{to}{rest}");
                    break;
                }
            }
            renamed.insert(new, v);
        }
        tensors = renamed;
    }
    let vars = vs.variables();
    let mut missing = Vec::new();
    let mut used = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        for name in names {
            let var = &vars[name];
            match tensors.get(name) {
                None => missing.push(name.clone()),
                Some((t, file)) => {
                    if t.size() != var.size() {
                        bail!(
                            "{}: tensor {name} has shape {:?}, the model expects {:?}",
                            file.display(),
                            t.size(),
                            var.size()
                        );
                    }
                    let mut v = var.shallow_clone();
                    v.copy_(&t.to_kind(var.kind()).to_device(var.device()));
                    used.insert(name.clone());
                }
            }
        }
        Ok(())
    })?;
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(8);
        bail!(
            "{file_list}: {n} tensor(s) the model needs are missing, e.g. {}",
            missing.join(", ")
        );
    }
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !used.contains(*k) && !ignored(k, &opts.ignore))
        .collect();
    if !unexpected.is_empty() {
        let n = unexpected.len();
        let shown: Vec<String> = unexpected.iter().take(8).map(|s| s.to_string()).collect();
        bail!(
            "{file_list}: {n} unexpected tensor(s) the model does not have (wrong architecture or config?), e.g. {}",
            shown.join(", ")
        );
    }
    Ok(())
}

/// Find the weight files of a diffusers / transformers component folder, preferring
/// `variant` (e.g. "fp16") when given. Sharded checkpoints (`*.safetensors.index.json`)
/// are supported.
pub fn find_weight_files(
    dir: &Path,
    stems: &[&str],
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let mut candidates = Vec::new();
    for stem in stems {
        if let Some(v) = variant {
            candidates.push(format!("{stem}.{v}.safetensors"));
        }
        candidates.push(format!("{stem}.safetensors"));
    }
    for c in &candidates {
        let p = dir.join(c);
        if p.is_file() {
            return Ok(vec![p]);
        }
        let idx = dir.join(format!("{c}.index.json"));
        if idx.is_file() {
            let text = std::fs::read_to_string(&idx)
                .with_context(|| format!("reading {}", idx.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", idx.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no weight_map object", idx.display()))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    bail!(
        "{}: no weights found (looked for {}); .bin/.ckpt files are not supported, convert them to safetensors",
        dir.display(),
        candidates.join(", ")
    )
}

/// Write named tensors to a safetensors file atomically (temp file + rename),
/// converting floating-point tensors to `kind` when given.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    path: &Path,
    kind: Option<Kind>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut owned: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu);
        let t = match kind {
            Some(k) if t.is_floating_point() => t.to_kind(k),
            _ => t,
        }
        .contiguous();
        let dtype = dtype_of(t.kind())?;
        let numel = t.numel();
        let nbytes = numel * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; nbytes];
        if numel > 0 {
            t.f_copy_data_u8(&mut buf, numel)?;
        }
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), buf, shape, dtype));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, b, s, d)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, metadata)?;
    atomic_write(path, &bytes)
}

/// Write a file atomically: write a sibling temp file, fsync, rename over the target.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = (|| -> Result<()> {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        // A full disk must not leave the temporary file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Save every variable of a VarStore under its own name.
pub fn save_varstore(vs: &VarStore, path: &Path, kind: Option<Kind>) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    save_safetensors(
        &vars,
        path,
        kind,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
}

/// The floating-point kind of the tensors in a safetensors file (the most common one).
pub fn file_float_kind(path: &Path) -> Result<Kind> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("parsing safetensors header of {}", path.display()))?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, info) in meta.tensors() {
        if let Some(k) = kind_of(info.dtype) {
            if matches!(k, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
                *counts.entry(format!("{k:?}")).or_default() += 1;
            }
        }
    }
    let best = counts.into_iter().max_by_key(|(_, c)| *c).map(|(k, _)| k);
    Ok(match best.as_deref() {
        Some("Half") => Kind::Half,
        Some("BFloat16") => Kind::BFloat16,
        Some("Double") => Kind::Double,
        _ => Kind::Float,
    })
}
