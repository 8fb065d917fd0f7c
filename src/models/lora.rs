//! LoRA (low-rank adapters) for the linear layers of the UNet and the SD3 MMDiT, in the
//! layout of PEFT and diffusers.
//!
//! A targeted layer computes `base(x) + scale * B(A(dropout(x)))`, with `A: [r, in]`,
//! `B: [out, r]` and `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA), as PEFT's
//! `lora.Linear` does. The adapter tensors are variables of the model's own VarStore,
//! named as PEFT names them (`<module>.lora_A.weight`, `<module>.lora_B.weight`), so the
//! optimiser, the EMA, checkpoints and the trajectory copies see them like any other
//! variable; the base weights are frozen separately (see `train.lora`).
//!
//! Files: [`save_peft`] writes `pytorch_lora_weights.safetensors` as diffusers'
//! `save_lora_weights` does (keys prefixed with `unet.` or `transformer.`, rank and alpha
//! in the `lora_adapter_metadata` header that `load_lora_weights` reads); [`LoraFile`]
//! reads such files (made by diffusers / PEFT or by `adt`), and can be attached at run
//! time or merged into the base weights (`W += scale * B A`).
//!
//! Which layers can carry an adapter: the attention projections (`to_q`, `to_k`,
//! `to_v`, `to_out.0`, and in the MMDiT `add_q_proj`, `add_k_proj`, `add_v_proj`,
//! `to_add_out`) and the feed-forward layers (`ff.net.0.proj`, `ff.net.2`,
//! `ff_context.*`). Convolutions cannot.

use anyhow::{bail, ensure, Context, Result};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::{nn, nn::Module, Kind, Tensor};

/// The file name diffusers' `save_lora_weights` writes and `load_lora_weights` looks for.
pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The safetensors header key of diffusers' LoRA metadata (its `LORA_ADAPTER_METADATA_KEY`).
pub const METADATA_KEY: &str = "lora_adapter_metadata";

#[derive(Debug)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
}

/// The adapter attached to one linear layer (none until one is attached).
#[derive(Debug)]
pub struct Slot {
    name: String,
    /// The base layer's weight `[out, in]` (a handle on the same tensor).
    weight: Mutex<Tensor>,
    adapter: Mutex<Option<Adapter>>,
}

impl Slot {
    /// The module name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A linear layer that can carry a LoRA adapter.
#[derive(Debug)]
pub struct LoraLinear {
    pub base: nn::Linear,
    slot: Arc<Slot>,
}

thread_local! {
    static COLLECTING: RefCell<Vec<Vec<Arc<Slot>>>> = const { RefCell::new(Vec::new()) };
}

/// A linear layer with diffusers' name `p`, able to carry an adapter. Model constructors
/// gather the layers they build with [`collect`].
pub fn lora_linear(p: &nn::Path, d_in: i64, d_out: i64, bias: bool) -> LoraLinear {
    let base = nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    );
    let name = p.path("weight");
    let name = name.strip_suffix(".weight").unwrap_or(&name).to_string();
    let slot = Arc::new(Slot {
        name,
        weight: Mutex::new(base.ws.shallow_clone()),
        adapter: Mutex::new(None),
    });
    COLLECTING.with(|c| {
        if let Some(top) = c.borrow_mut().last_mut() {
            top.push(slot.clone());
        }
    });
    LoraLinear { base, slot }
}

/// Run a model constructor and gather the [`LoraLinear`] layers it built.
pub fn collect<T>(build: impl FnOnce() -> T) -> (T, LoraSlots) {
    COLLECTING.with(|c| c.borrow_mut().push(Vec::new()));
    let out = build();
    let slots = COLLECTING
        .with(|c| c.borrow_mut().pop())
        .unwrap_or_default();
    (out, LoraSlots(slots))
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = self.base.forward(x);
        let guard = self.slot.adapter.lock().unwrap();
        match &*guard {
            None => y,
            Some(ad) => {
                // Dropout only where a gradient is taken (training), as PEFT in train mode:
                // an op on a trainable adapter records a graph only with grad enabled.
                let train = ad.dropout > 0.0 && ad.a.get(0).get(0).requires_grad();
                let h = if train {
                    x.dropout(ad.dropout, true)
                } else {
                    x.shallow_clone()
                };
                let h = h.to_kind(ad.a.kind()).matmul(&ad.a.tr());
                let h = h.matmul(&ad.b.tr()) * ad.scale;
                y + h.to_kind(x.kind())
            }
        }
    }
}

/// What to adapt and how (`train.lora`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    /// Module-name suffixes, PEFT's `target_modules` matching: a layer is targeted when
    /// its name equals a target or ends with `.` + target.
    pub targets: Vec<String>,
}

/// The default targets: the attention projections.
pub fn default_targets() -> Vec<String> {
    ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn matches(name: &str, target: &str) -> bool {
    name == target || name.ends_with(&format!(".{target}"))
}

/// The adapter-capable layers of one model.
#[derive(Debug, Default)]
pub struct LoraSlots(Vec<Arc<Slot>>);

fn sub_path<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.clone(), |p, c| p.sub(c))
}

impl LoraSlots {
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|s| s.name()).collect()
    }

    fn get(&self, name: &str) -> Option<&Arc<Slot>> {
        self.0.iter().find(|s| s.name == name)
    }

    /// Create trainable adapters on every layer `spec` targets, as variables under `root`
    /// (the model's VarStore root) with PEFT's initialisation: A uniform in
    /// `[-1/sqrt(in), 1/sqrt(in)]` (kaiming-uniform with a = sqrt(5)), B zero, so the
    /// model's output is unchanged until B is trained. Returns the adapted module names.
    pub fn attach_new(&self, root: &nn::Path, spec: &LoraSpec) -> Result<Vec<String>> {
        ensure!(spec.rank >= 1, "train.lora.rank must be at least 1");
        ensure!(
            (0.0..1.0).contains(&spec.dropout),
            "train.lora.dropout must be in [0, 1)"
        );
        ensure!(!spec.targets.is_empty(), "train.lora.targets is empty");
        for t in &spec.targets {
            if !self.0.iter().any(|s| matches(&s.name, t)) {
                bail!(
                    "train.lora.targets: {t:?} matches no layer that can carry an adapter \
                     (attention projections to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, \
                     add_v_proj, to_add_out; feed-forward ff.net.0.proj, ff.net.2)"
                );
            }
        }
        let mut done = Vec::new();
        for s in &self.0 {
            if !spec.targets.iter().any(|t| matches(&s.name, t)) {
                continue;
            }
            let (d_out, d_in) = s_shape(s)?;
            let p = sub_path(root, &s.name);
            let bound = 1.0 / (d_in as f64).sqrt();
            // Adapters are float32 (float64 on a float64 model) whatever the base's
            // dtype: a bfloat16 base (`train.base_dtype`) keeps float32 adapters.
            let opts = (adapter_kind(base_weight(s)?.kind()), s_device(s)?);
            let a = (&p / "lora_A").add(
                "weight",
                Tensor::zeros([spec.rank, d_in], opts).uniform_(-bound, bound),
                true,
            );
            let b = (&p / "lora_B").add("weight", Tensor::zeros([d_out, spec.rank], opts), true);
            *s.adapter.lock().unwrap() = Some(Adapter {
                a,
                b,
                scale: spec.alpha / spec.rank as f64,
                dropout: spec.dropout,
            });
            done.push(s.name.clone());
        }
        Ok(done)
    }

    /// Give this model (a copy of `master`'s architecture) adapters of the same shapes
    /// and scales as `master`'s, as frozen variables under `root`: the caller fills
    /// them (the trajectory copies pair them by name with the master's).
    pub fn attach_like(&self, root: &nn::Path, master: &LoraSlots) -> Result<()> {
        for m in &master.0 {
            let guard = m.adapter.lock().unwrap();
            let Some(ad) = &*guard else { continue };
            let s = self
                .get(&m.name)
                .with_context(|| format!("LoRA copy: no layer {}", m.name))?;
            let p = sub_path(root, &m.name);
            let a = (&p / "lora_A").zeros_no_train("weight", &ad.a.size());
            let b = (&p / "lora_B").zeros_no_train("weight", &ad.b.size());
            *s.adapter.lock().unwrap() = Some(Adapter {
                a,
                b,
                scale: ad.scale,
                dropout: 0.0,
            });
        }
        Ok(())
    }

    /// Attach the adapters of a file at run time (frozen, not VarStore variables), at
    /// `scale` times the file's own scale. Replaces any adapter already attached.
    pub fn attach_file(&self, file: &LoraFile, scale: f64) -> Result<()> {
        for (name, m) in file.modules_checked(self)? {
            let s = self.get(name).expect("checked");
            let device = s_device(s)?;
            *s.adapter.lock().unwrap() = Some(Adapter {
                a: m.a.to_device(device),
                b: m.b.to_device(device),
                scale: m.scale * scale,
                dropout: 0.0,
            });
        }
        Ok(())
    }

    /// Remove every adapter.
    pub fn detach_all(&self) {
        for s in &self.0 {
            *s.adapter.lock().unwrap() = None;
        }
    }

    /// Add `scale * file_scale * B A` of every module of `file` to the base weights, in
    /// place (diffusers' `fuse_lora`).
    pub fn merge_file(&self, file: &LoraFile, scale: f64) -> Result<()> {
        let mods = file.modules_checked(self)?;
        tch::no_grad(|| -> Result<()> {
            for (name, m) in mods {
                let s = self.get(name).expect("checked");
                let w = base_weight(s)?;
                let delta =
                    m.b.to_device(w.device())
                        .to_kind(Kind::Float)
                        .matmul(&m.a.to_device(w.device()).to_kind(Kind::Float))
                        * (m.scale * scale);
                let mut w = w;
                let _ = w.g_add_(&delta.to_kind(w.kind()));
            }
            Ok(())
        })
    }

    /// The attached trainable adapters as `(module, A, B)`, sorted by module name.
    pub fn adapters(&self) -> Vec<(String, Tensor, Tensor)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .filter_map(|s| {
                s.adapter
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|a| (s.name.clone(), a.a.shallow_clone(), a.b.shallow_clone()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The dtype of trainable adapters on a base of dtype `base`: float64 for a float64
/// model (gradient tests), float32 otherwise.
pub fn adapter_kind(base: Kind) -> Kind {
    if base == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

fn s_shape(s: &Slot) -> Result<(i64, i64)> {
    let w = base_weight(s)?;
    let sz = w.size();
    Ok((sz[0], sz[1]))
}

fn s_device(s: &Slot) -> Result<tch::Device> {
    Ok(base_weight(s)?.device())
}

fn base_weight(s: &Slot) -> Result<Tensor> {
    Ok(s.weight.lock().unwrap().shallow_clone())
}

/// One module of a LoRA file.
#[derive(Debug)]
pub struct LoraModule {
    pub a: Tensor,
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scale: f64,
}

/// A LoRA file for one model (the UNet or the SD3 transformer), in the PEFT layout that
/// diffusers saves and loads.
#[derive(Debug)]
pub struct LoraFile {
    pub modules: BTreeMap<String, LoraModule>,
    pub rank: i64,
    pub alpha: f64,
}

impl LoraFile {
    /// Read a `pytorch_lora_weights.safetensors` (or a folder holding one). `prefix`:
    /// `unet` or `transformer`; keys of other components (text encoders) are ignored.
    pub fn load(path: &Path, prefix: &str) -> Result<LoraFile> {
        let path = if path.is_dir() {
            path.join(LORA_FILE)
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let meta: HashMap<String, serde_json::Value> = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .map(|s| serde_json::from_str(s))
            .transpose()
            .with_context(|| format!("{}: header {METADATA_KEY} is not JSON", path.display()))?
            .unwrap_or_default();
        let tensors = crate::weights::parse_safetensors(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        Self::from_tensors(tensors, &meta, prefix)
            .with_context(|| format!("LoRA file {}", path.display()))
    }

    fn from_tensors(
        tensors: Vec<(String, Tensor)>,
        meta: &HashMap<String, serde_json::Value>,
        prefix: &str,
    ) -> Result<LoraFile> {
        let pre = format!("{prefix}.");
        let mut a_of: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut b_of: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut others = 0;
        for (k, t) in tensors {
            let Some(k) = k.strip_prefix(&pre) else {
                others += 1;
                continue;
            };
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                a_of.insert(m.to_string(), t);
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                b_of.insert(m.to_string(), t);
            } else {
                bail!(
                    "tensor {pre}{k}: not a PEFT LoRA weight (expected ...lora_A.weight / \
                     ...lora_B.weight; DoRA, LoRA biases and the older diffusers or kohya \
                     layouts are not supported)"
                );
            }
        }
        ensure!(
            !a_of.is_empty(),
            "no {pre}...lora_A.weight tensors ({others} tensors with other prefixes)"
        );
        let get = |k: &str| meta.get(&format!("{prefix}.{k}"));
        for k in ["use_dora", "lora_bias"] {
            if get(k).and_then(|v| v.as_bool()) == Some(true) {
                bail!("{prefix}.{k} = true is not supported");
            }
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if let Some(v) = get(k).and_then(|v| v.as_object()) {
                ensure!(
                    v.is_empty(),
                    "{prefix}.{k} (per-module ranks or alphas) is not supported"
                );
            }
        }
        let rsl = get("use_rslora").and_then(|v| v.as_bool()) == Some(true);
        let mut modules = BTreeMap::new();
        let mut rank = 0;
        for (m, a) in a_of {
            let b = b_of
                .remove(&m)
                .with_context(|| format!("{pre}{m}.lora_A.weight has no lora_B.weight"))?;
            let (sa, sb) = (a.size(), b.size());
            ensure!(
                sa.len() == 2 && sb.len() == 2 && sa[0] == sb[1],
                "{pre}{m}: lora_A {sa:?} and lora_B {sb:?} do not form a low-rank pair \
                 (convolution adapters are not supported)"
            );
            rank = sa[0];
            modules.insert(m, (a, b));
        }
        if let Some(m) = b_of.keys().next() {
            bail!("{pre}{m}.lora_B.weight has no lora_A.weight");
        }
        let r = get("r").and_then(|v| v.as_f64()).unwrap_or(rank as f64);
        // Without metadata, diffusers uses alpha = r (scale 1).
        let alpha = get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(r);
        let modules = modules
            .into_iter()
            .map(|(m, (a, b))| {
                let r = a.size()[0] as f64;
                let scale = if rsl { alpha / r.sqrt() } else { alpha / r };
                (m, LoraModule { a, b, scale })
            })
            .collect();
        Ok(LoraFile {
            modules,
            rank,
            alpha,
        })
    }

    fn modules_checked<'a>(&'a self, slots: &LoraSlots) -> Result<Vec<(&'a str, &'a LoraModule)>> {
        let mut out = Vec::new();
        for (name, m) in &self.modules {
            let s = slots.get(name).with_context(|| {
                format!("LoRA module {name}: the model has no such linear layer")
            })?;
            let (d_out, d_in) = s_shape(s)?;
            ensure!(
                m.a.size()[1] == d_in && m.b.size()[0] == d_out,
                "LoRA module {name}: lora_A {:?} / lora_B {:?} do not fit the layer's weight [{d_out}, {d_in}]",
                m.a.size(),
                m.b.size()
            );
            out.push((name.as_str(), m));
        }
        Ok(out)
    }
}

/// Write the attached adapters of `slots` as diffusers writes a LoRA:
/// `<dir>/pytorch_lora_weights.safetensors`, keys `<prefix>.<module>.lora_A.weight`,
/// float32, with the PEFT configuration (rank, alpha, targets) in the
/// `lora_adapter_metadata` header.
pub fn save_peft(slots: &LoraSlots, spec: &LoraSpec, prefix: &str, dir: &Path) -> Result<()> {
    let mut tensors = Vec::new();
    for (m, a, b) in slots.adapters() {
        tensors.push((format!("{prefix}.{m}.lora_A.weight"), a.detach()));
        tensors.push((format!("{prefix}.{m}.lora_B.weight"), b.detach()));
    }
    ensure!(!tensors.is_empty(), "no LoRA adapters to save");
    let config = serde_json::json!({
        format!("{prefix}.r"): spec.rank,
        format!("{prefix}.lora_alpha"): spec.alpha,
        format!("{prefix}.lora_dropout"): spec.dropout,
        format!("{prefix}.target_modules"): spec.targets,
        format!("{prefix}.peft_type"): "LORA",
        format!("{prefix}.bias"): "none",
        format!("{prefix}.use_rslora"): false,
        format!("{prefix}.use_dora"): false,
        format!("{prefix}.init_lora_weights"): true,
    });
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        METADATA_KEY.to_string(),
        serde_json::to_string_pretty(&config)?,
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::weights::save_safetensors(
        &tensors,
        &dir.join(LORA_FILE),
        Some(Kind::Float),
        Some(meta),
    )
}
