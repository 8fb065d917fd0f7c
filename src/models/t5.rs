//! The T5 encoder in the transformers layout (`T5EncoderModel`), as SD3 uses it for
//! `text_encoder_3` (T5 v1.1 XXL).
//!
//! * `shared.weight` is the token embedding; the encoder's `embed_tokens` is tied to
//!   it (a file that stores `encoder.embed_tokens.weight` as well, or only that one,
//!   loads too).
//! * Every block is pre-norm: `layer.0` is self-attention, `layer.1` the feed-forward,
//!   each preceded by a T5 layer norm (RMS, no mean subtraction, no bias) and added
//!   to the residual stream.
//! * Attention logits are not scaled by `1/sqrt(d_kv)`. A learned relative-position
//!   bias (bidirectional buckets) lives in block 0 only and is added in every block.
//! * The feed-forward is `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) * wi_1(x))`,
//!   per `feed_forward_proj` ("relu", "gated-gelu", ...).
//!
//! In half precision the feed-forward output projections `wo` stay in float32, as
//! transformers keeps them (`_keep_in_fp32_modules`); the residual stream then runs
//! in float32 after the first block, which keeps T5 v1.1 from overflowing.

use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

fn d_vocab() -> i64 {
    32128
}
fn d_model() -> i64 {
    512
}
fn d_kv() -> i64 {
    64
}
fn d_ff() -> i64 {
    2048
}
fn d_layers() -> i64 {
    6
}
fn d_heads() -> i64 {
    8
}
fn d_buckets() -> i64 {
    32
}
fn d_max_distance() -> i64 {
    128
}
fn d_eps() -> f64 {
    1e-6
}
fn d_ff_proj() -> String {
    "relu".to_string()
}

/// `config.json` of a transformers T5 model (the encoder's fields; decoder-only
/// fields are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_model")]
    pub d_model: i64,
    #[serde(default = "d_kv")]
    pub d_kv: i64,
    #[serde(default = "d_ff")]
    pub d_ff: i64,
    #[serde(default = "d_layers")]
    pub num_layers: i64,
    #[serde(default = "d_heads")]
    pub num_heads: i64,
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: i64,
    #[serde(default = "d_max_distance")]
    pub relative_attention_max_distance: i64,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_ff_proj")]
    pub feed_forward_proj: String,
    /// Overrides the activation derived from `feed_forward_proj` when present (as
    /// transformers does when the key is in `config.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_act_fn: Option<String>,
}

/// Activation of the feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Act {
    Relu,
    /// Exact (erf) GELU (`gelu`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Silu,
}

impl T5Act {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => T5Act::Relu,
            "gelu" => T5Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => T5Act::GeluTanh,
            "silu" | "swish" => T5Act::Silu,
            other => bail!(
                "T5 config: activation {other:?} is not supported \
                 (expected relu, gelu, gelu_new, gelu_pytorch_tanh or silu)"
            ),
        })
    }

    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            T5Act::Relu => x.relu(),
            T5Act::Gelu => x.gelu("none"),
            T5Act::GeluTanh => x.gelu("tanh"),
            T5Act::Silu => x.silu(),
        }
    }
}

impl T5Config {
    /// A tiny encoder for tests (gated-gelu like T5 v1.1).
    pub fn tiny() -> Self {
        T5Config {
            vocab_size: 128,
            d_model: 32,
            d_kv: 8,
            d_ff: 48,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 20,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".to_string(),
            dense_act_fn: None,
        }
    }

    /// T5 v1.1 XXL, the SD3 `text_encoder_3`.
    pub fn v1_1_xxl() -> Self {
        T5Config {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".to_string(),
            dense_act_fn: None,
        }
    }

    /// `(gated, activation)` from `feed_forward_proj` (and `dense_act_fn`), following
    /// transformers: "gated-gelu" means gated `gelu_new`.
    pub fn feed_forward(&self) -> Result<(bool, T5Act)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => bail!(
                "T5 config field feed_forward_proj = {:?} is not supported \
                 (expected \"<act>\" or \"gated-<act>\")",
                self.feed_forward_proj
            ),
        };
        let act = match (&self.dense_act_fn, self.feed_forward_proj.as_str()) {
            (Some(a), _) => a.as_str(),
            (None, "gated-gelu") => "gelu_new",
            (None, _) => act,
        };
        Ok((gated, T5Act::parse(act)?))
    }

    /// Check the fields that change the architecture.
    pub fn validate(&self) -> Result<()> {
        self.feed_forward()?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            ensure!(v > 0, "T5 config field {name} = {v} must be positive");
        }
        ensure!(
            self.relative_attention_num_buckets >= 4,
            "T5 config field relative_attention_num_buckets = {} must be at least 4",
            self.relative_attention_num_buckets
        );
        ensure!(
            self.relative_attention_max_distance > self.relative_attention_num_buckets / 4,
            "T5 config field relative_attention_max_distance = {} must exceed num_buckets / 4 = {}",
            self.relative_attention_max_distance,
            self.relative_attention_num_buckets / 4
        );
        Ok(())
    }

    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::models::config::read_json(path)?;
        let cfg: T5Config = serde_json::from_value(v)
            .with_context(|| format!("{}: invalid T5 config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported T5 config", path.display()))?;
        Ok(cfg)
    }
}

/// T5's layer norm: `weight * x / sqrt(mean(x^2) + eps)`, statistics in float32; the
/// result is cast to the weight's kind when that is half / bfloat16.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        T5LayerNorm {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let var = x
            .to_kind(Kind::Float)
            .square()
            .mean_dim(-1, true, Kind::Float);
        let mut y = x * (var + self.eps).rsqrt();
        if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
            y = y.to_kind(self.weight.kind());
        }
        &self.weight * y
    }
}

fn linear_nobias(p: &nn::Path, d_in: i64, d_out: i64) -> nn::Linear {
    nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

/// The bidirectional relative-position bucket of `relative_position = key - query`
/// (transformers' `T5Attention._relative_position_bucket`): half the buckets for each
/// sign; within a half, exact buckets for distances below `num_buckets / 4`, then
/// log-spaced buckets up to `max_distance`, clamped to the last bucket. The log is
/// computed in float32, as transformers does, so the boundaries agree exactly.
pub fn relative_position_bucket(
    relative_position: &Tensor,
    num_buckets: i64,
    max_distance: i64,
) -> Tensor {
    let half = num_buckets / 2;
    let sign_offset = relative_position.gt(0).to_kind(Kind::Int64) * half;
    let n = relative_position.abs();
    let max_exact = half / 2;
    let is_small = n.lt(max_exact);
    let large = (n.to_kind(Kind::Float) / max_exact as f64).log()
        / ((max_distance as f64) / (max_exact as f64)).ln()
        * (half - max_exact) as f64;
    let large = (large.to_kind(Kind::Int64) + max_exact).clamp_max(half - 1);
    sign_offset + n.where_self(&is_small, &large)
}

#[derive(Debug)]
struct SelfAttention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    relative_attention_bias: Option<nn::Embedding>,
}

#[derive(Debug)]
enum DenseAct {
    Plain { wi: nn::Linear },
    Gated { wi_0: nn::Linear, wi_1: nn::Linear },
}

#[derive(Debug)]
struct Block {
    attn_norm: T5LayerNorm,
    attn: SelfAttention,
    ff_norm: T5LayerNorm,
    dense: DenseAct,
    wo: nn::Linear,
}

/// The T5 encoder stack (`shared` + `encoder.*`).
#[derive(Debug)]
pub struct T5EncoderModel {
    shared: nn::Embedding,
    blocks: Vec<Block>,
    final_layer_norm: T5LayerNorm,
    act: T5Act,
    heads: i64,
    d_kv: i64,
    num_buckets: i64,
    max_distance: i64,
}

impl T5EncoderModel {
    /// Build the variables under `p` with the transformers names.
    pub fn new(p: &nn::Path, cfg: &T5Config) -> Result<Self> {
        cfg.validate()?;
        let (gated, act) = cfg.feed_forward()?;
        let inner = cfg.num_heads * cfg.d_kv;
        let d = cfg.d_model;
        let shared = nn::embedding(p / "shared", cfg.vocab_size, d, Default::default());
        let enc = p / "encoder";
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = &enc / "block" / i;
                let l0 = &b / "layer" / 0;
                let sa = &l0 / "SelfAttention";
                let l1 = &b / "layer" / 1;
                let ff = &l1 / "DenseReluDense";
                let relative_attention_bias = (i == 0).then(|| {
                    nn::embedding(
                        &sa / "relative_attention_bias",
                        cfg.relative_attention_num_buckets,
                        cfg.num_heads,
                        Default::default(),
                    )
                });
                let dense = if gated {
                    DenseAct::Gated {
                        wi_0: linear_nobias(&(&ff / "wi_0"), d, cfg.d_ff),
                        wi_1: linear_nobias(&(&ff / "wi_1"), d, cfg.d_ff),
                    }
                } else {
                    DenseAct::Plain {
                        wi: linear_nobias(&(&ff / "wi"), d, cfg.d_ff),
                    }
                };
                Block {
                    attn_norm: T5LayerNorm::new(&(&l0 / "layer_norm"), d, cfg.layer_norm_epsilon),
                    attn: SelfAttention {
                        q: linear_nobias(&(&sa / "q"), d, inner),
                        k: linear_nobias(&(&sa / "k"), d, inner),
                        v: linear_nobias(&(&sa / "v"), d, inner),
                        o: linear_nobias(&(&sa / "o"), inner, d),
                        relative_attention_bias,
                    },
                    ff_norm: T5LayerNorm::new(&(&l1 / "layer_norm"), d, cfg.layer_norm_epsilon),
                    dense,
                    wo: linear_nobias(&(&ff / "wo"), cfg.d_ff, d),
                }
            })
            .collect();
        Ok(T5EncoderModel {
            shared,
            blocks,
            final_layer_norm: T5LayerNorm::new(
                &(&enc / "final_layer_norm"),
                d,
                cfg.layer_norm_epsilon,
            ),
            act,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    /// The relative-position bias `[1, heads, S, S]` from block 0's table.
    fn position_bias(&self, s: i64, device: Device) -> Tensor {
        let table = self.blocks[0]
            .attn
            .relative_attention_bias
            .as_ref()
            .expect("block 0 holds the relative attention bias");
        let pos = Tensor::arange(s, (Kind::Int64, device));
        let rel = pos.unsqueeze(0) - pos.unsqueeze(1);
        let buckets = relative_position_bucket(&rel, self.num_buckets, self.max_distance);
        table.forward(&buckets).permute([2, 0, 1]).unsqueeze(0)
    }

    /// Run the encoder on int64 `input_ids` `[B, S]` with an optional padding
    /// `attention_mask` `[B, S]` (1 = attend, 0 = padding). Returns the final hidden
    /// states `[B, S, d_model]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = input_ids
            .size2()
            .with_context(|| format!("T5 input_ids must be [B, S], got {:?}", input_ids.size()))?;
        ensure!(s >= 1, "T5 input_ids: empty sequence");
        let device = self.shared.ws.device();
        let ids = input_ids.to_device(device).to_kind(Kind::Int64);
        let mut bias = self.position_bias(s, device);
        if let Some(m) = attention_mask {
            ensure!(
                m.size() == [b, s],
                "T5 attention_mask must be [{b}, {s}] like input_ids, got {:?}",
                m.size()
            );
            let masked = m.to_device(device).eq(0).view([b, 1, 1, s]);
            bias = bias.masked_fill(&masked, finfo_min(bias.kind()));
        }
        let mut x = self.shared.forward(&ids);
        for block in &self.blocks {
            x = block.forward(&x, &bias, self.heads, self.d_kv, self.act);
        }
        Ok(self.final_layer_norm.forward(&x))
    }
}

fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// transformers clamps float16 hidden states just inside the finite range.
fn clamp_half(x: Tensor) -> Tensor {
    if x.kind() != Kind::Half {
        return x;
    }
    let max = 65504.0;
    let limit = if x.isinf().any().int64_value(&[]) != 0 {
        max - 1000.0
    } else {
        max
    };
    x.clamp(-limit, limit)
}

impl Block {
    fn forward(&self, x: &Tensor, bias: &Tensor, heads: i64, d_kv: i64, act: T5Act) -> Tensor {
        let (b, s, _) = x.size3().expect("T5 hidden states are [B, S, D]");
        let h = self.attn_norm.forward(x);
        let split = |t: Tensor| t.view([b, s, heads, d_kv]).transpose(1, 2);
        let q = split(self.attn.q.forward(&h));
        let k = split(self.attn.k.forward(&h));
        let v = split(self.attn.v.forward(&h));
        let bias = bias.to_kind(q.kind());
        let a =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, 1.0, false);
        let a = a.transpose(1, 2).reshape([b, s, heads * d_kv]);
        let x = clamp_half(x + self.attn.o.forward(&a));
        let h = self.ff_norm.forward(&x);
        let h = match &self.dense {
            DenseAct::Plain { wi } => act.apply(&wi.forward(&h)),
            DenseAct::Gated { wi_0, wi_1 } => act.apply(&wi_0.forward(&h)) * wi_1.forward(&h),
        };
        let h = h.to_kind(self.wo.ws.kind());
        clamp_half(&x + self.wo.forward(&h))
    }
}

/// A T5 encoder loaded from a checkpoint folder.
pub struct LoadedT5 {
    pub vs: VarStore,
    pub model: T5EncoderModel,
    pub config: T5Config,
}

impl T5EncoderModel {
    /// Load `config.json` + `model*.safetensors` (plain, fp16 variant or sharded) from
    /// `dir`, converting the weights to `kind` (with `wo` kept in float32 for half).
    /// The variables are frozen (no gradient), as a text encoder is in training.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedT5> {
        let config = T5Config::from_file(&dir.join("config.json"))?;
        let variant = (kind == Kind::Half).then_some("fp16");
        let files = weights::find_weight_files(dir, &["model"], variant).or_else(|e| {
            weights::find_weight_files(dir, &["model"], Some("fp16")).map_err(|_| e)
        })?;
        let mut names = Vec::new();
        for f in &files {
            names.extend(weights::tensor_names(f)?);
        }
        let has = |n: &str| names.iter().any(|x| x == n);
        let mut opts = weights::LoadOptions::default();
        if has("shared.weight") {
            opts.ignore.push("encoder.embed_tokens.weight".into());
        } else if has("encoder.embed_tokens.weight") {
            opts.rename
                .push(("encoder.embed_tokens.weight".into(), "shared.weight".into()));
        }
        let mut vs = VarStore::new(device);
        let model = T5EncoderModel::new(&vs.root(), &config)
            .with_context(|| format!("building the T5 encoder of {}", dir.display()))?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        if kind == Kind::Half {
            tch::no_grad(|| {
                for (name, mut var) in vs.variables() {
                    if name.ends_with("DenseReluDense.wo.weight") {
                        let f = var.to_kind(Kind::Float);
                        var.set_data(&f);
                    }
                }
            });
        }
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        Ok(LoadedT5 { vs, model, config })
    }
}

/// `adt forward t5`: inputs `input_ids` (int64 `[B, S]`) and optional
/// `attention_mask`; output `last_hidden_state`. Runs in float32 on the CPU.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "t5" {
        bail!("unknown T5 component {component:?} (expected \"t5\")");
    }
    let input_ids = inputs
        .get("input_ids")
        .with_context(|| format!("{component}: missing input tensor \"input_ids\""))?;
    let mask = inputs.get("attention_mask");
    let loaded = T5EncoderModel::load(model_dir, Device::Cpu, Kind::Float)?;
    let out = tch::no_grad(|| loaded.model.forward(input_ids, mask))?;
    Ok(HashMap::from([("last_hidden_state".to_string(), out)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets against transformers' formula evaluated by hand for 32 buckets,
    /// max distance 20: exact buckets below 8 per sign, then log-spaced.
    #[test]
    fn buckets_follow_the_t5_rule() {
        let rel = Tensor::from_slice(&[0i64, 1, 7, 8, 12, 19, 20, 100, -1, -7, -8, -20, -100]);
        let got: Vec<i64> = Vec::try_from(relative_position_bucket(&rel, 32, 20)).unwrap();
        // Positive distances use buckets 16..32; n >= 8: 8 + floor(ln(n/8)/ln(20/8) * 8).
        let large =
            |n: f64| (8.0 + ((n / 8.0).ln() / (2.5f64).ln() * 8.0).floor()).min(15.0) as i64;
        let want = vec![
            0,
            16 + 1,
            16 + 7,
            16 + large(8.0),
            16 + large(12.0),
            16 + large(19.0),
            16 + 15,
            16 + 15,
            1,
            7,
            large(8.0),
            15,
            15,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn rejects_unknown_feed_forward() {
        let mut cfg = T5Config::tiny();
        cfg.feed_forward_proj = "gated-foo".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("foo"), "{err}");
        cfg.feed_forward_proj = "a-b-c".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj"), "{err}");
    }
}
