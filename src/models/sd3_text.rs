//! The SD3 text conditioning, as diffusers' `StableDiffusion3Pipeline.encode_prompt`
//! forms it from three encoders:
//!
//! * `text_encoder` (CLIP ViT-L with projection) and `text_encoder_2` (OpenCLIP
//!   bigG with projection), each on 77 tokens (`tokenizer/`, `tokenizer_2/`, padded
//!   as their configs say): penultimate hidden states concatenated on the channel
//!   axis (768 + 1280 = 2048), zero-padded to the T5 width (4096);
//! * `text_encoder_3` (T5 v1.1 XXL encoder) on `max_sequence_length` tokens (256 by
//!   default) from `tokenizer_3/`, with `</s>` appended and `<pad>` padding, no
//!   attention mask;
//! * context = `[CLIP (77 tokens); T5 (max_sequence_length tokens)]` on the sequence
//!   axis, pooled = `[text_embeds_L, text_embeds_G]` (768 + 1280 = 2048).
//!
//! Without T5 (not loaded, or absent from the pipeline) the T5 part is zeros of
//! `[B, 77, width]`, exactly as diffusers does (its zero block has the CLIP window's
//! 77 tokens, not `max_sequence_length`); the width is then the transformer's
//! `joint_attention_dim`.
//!
//! The T5 tokenizer is read from `tokenizer_3/tokenizer.json` with the `tokenizers`
//! crate. Folders holding only the SentencePiece `spiece.model` are not supported
//! (convert them once, e.g. by saving `T5TokenizerFast` with transformers).

use crate::models::clip::{ClipTextConfig, ClipTextModel, LoadedClipText};
use crate::models::denoiser::Cond;
use crate::models::t5::{LoadedT5, T5Config, T5EncoderModel};
use crate::models::tokenizer::{ClipTokenizer, Pad};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// Tokens of each CLIP window (and of the zero block that replaces T5 when absent).
pub const CLIP_TOKENS: i64 = 77;
/// diffusers' default `max_sequence_length` for T5.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 256;

/// The T5 tokenizer (`tokenizer.json`), set to truncate and pad every prompt to a
/// fixed length, `</s>` included.
pub struct T5Tokenizer {
    tok: tokenizers::Tokenizer,
    max_length: usize,
    pad_id: u32,
}

fn configured_pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let v = crate::models::config::read_json(&p)?;
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Object(o)) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

impl T5Tokenizer {
    /// Load `dir/tokenizer.json` (pad token from `tokenizer_config.json` /
    /// `special_tokens_map.json`, else `<pad>`), producing rows of `max_length` ids.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            if dir.join("spiece.model").is_file() {
                bail!(
                    "{}: only the SentencePiece spiece.model is present; it is not supported. \
                     Provide tokenizer.json (e.g. load the folder with transformers' \
                     T5TokenizerFast and save_pretrained it)",
                    dir.display()
                );
            }
            bail!(
                "{}: no T5 tokenizer (tokenizer.json is missing)",
                dir.display()
            );
        }
        let tok = tokenizers::Tokenizer::from_file(&json)
            .map_err(|e| anyhow!("{}: cannot load: {e}", json.display()))?;
        let pad = configured_pad_token(dir)?.unwrap_or_else(|| "<pad>".to_string());
        Self::new(tok, &pad, max_length).with_context(|| format!("{}", json.display()))
    }

    /// Wrap a `tokenizers` tokenizer whose vocabulary holds `pad_token`.
    pub fn new(mut tok: tokenizers::Tokenizer, pad_token: &str, max_length: usize) -> Result<Self> {
        ensure!(
            max_length >= 2,
            "T5 tokenizer: max_length {max_length} must be at least 2"
        );
        let pad_id = tok.token_to_id(pad_token).with_context(|| {
            format!("T5 tokenizer: the vocabulary has no pad token {pad_token:?}")
        })?;
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| anyhow!("T5 tokenizer: cannot set truncation to {max_length}: {e}"))?;
        tok.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: pad_token.to_string(),
            ..Default::default()
        }));
        Ok(T5Tokenizer {
            tok,
            max_length,
            pad_id,
        })
    }

    /// A tiny SentencePiece-style (unigram, `▁` word marker) tokenizer over lower-case
    /// letters, digits and some punctuation, with T5's specials `<pad>` = 0,
    /// `</s>` = 1, `<unk>` = 2: for tests and the tiny random text stack. 72 pieces.
    pub fn tiny(max_length: usize) -> Result<Self> {
        use tokenizers::models::unigram::Unigram;
        use tokenizers::normalizers::Lowercase;
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        use tokenizers::processors::template::TemplateProcessing;
        let mut vocab: Vec<(String, f64)> = vec![
            ("<pad>".into(), 0.0),
            ("</s>".into(), 0.0),
            ("<unk>".into(), 0.0),
            ("\u{2581}".into(), -3.0),
        ];
        for c in 'a'..='z' {
            vocab.push((c.to_string(), -4.0));
            vocab.push((format!("\u{2581}{c}"), -3.5));
        }
        for c in "0123456789.,!?'-".chars() {
            vocab.push((c.to_string(), -4.0));
        }
        let model = Unigram::from(vocab, Some(2), false)
            .map_err(|e| anyhow!("building the tiny T5 unigram model: {e}"))?;
        let mut tok = tokenizers::Tokenizer::new(model);
        tok.with_normalizer(Some(Lowercase))
            .map_err(|e| anyhow!("tiny T5 normalizer: {e}"))?;
        tok.with_pre_tokenizer(Some(Metaspace::new(
            '\u{2581}',
            PrependScheme::Always,
            true,
        )));
        let post = TemplateProcessing::builder()
            .try_single("$A </s>")
            .map_err(|e| anyhow!("tiny T5 template: {e}"))?
            .special_tokens(vec![("</s>", 1)])
            .build()
            .map_err(|e| anyhow!("tiny T5 template: {e}"))?;
        tok.with_post_processor(Some(post));
        Self::new(tok, "<pad>", max_length)
    }

    /// The underlying tokenizer (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tok
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> i64 {
        i64::from(self.pad_id)
    }

    /// Ids of one prompt, `</s>` included, truncated / padded to `max_length`; and
    /// whether it was truncated.
    pub fn encode_row(&self, text: &str) -> Result<(Vec<i64>, bool)> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| anyhow!("T5 tokenizer: tokenizing {text:?}: {e}"))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        ensure!(
            ids.len() == self.max_length,
            "T5 tokenizer: {text:?} gave {} ids, expected {} after padding",
            ids.len(),
            self.max_length
        );
        Ok((ids, !enc.get_overflowing().is_empty()))
    }

    /// `[B, max_length]` int64 ids, and the number of truncated prompts.
    pub fn encode_padded(&self, texts: &[&str]) -> Result<(Tensor, usize)> {
        let mut flat = Vec::with_capacity(texts.len() * self.max_length);
        let mut truncated = 0;
        for t in texts {
            let (row, cut) = self.encode_row(t)?;
            flat.extend(row);
            truncated += usize::from(cut);
        }
        let ids = Tensor::from_slice(&flat).view([texts.len() as i64, self.max_length as i64]);
        Ok((ids, truncated))
    }
}

/// One CLIP encoder (with projection) and its tokenizer.
pub struct ClipBranch {
    pub tokenizer: ClipTokenizer,
    pub pad: Pad,
    pub encoder: LoadedClipText,
}

/// The T5 encoder and its tokenizer.
pub struct T5Branch {
    pub tokenizer: T5Tokenizer,
    pub encoder: LoadedT5,
}

/// Options of [`Sd3TextEncoders::load`].
#[derive(Debug, Clone)]
pub struct Sd3TextOptions {
    /// Load and run `text_encoder_3` (when the pipeline has one).
    pub use_t5: bool,
    /// T5 tokens per prompt.
    pub max_sequence_length: usize,
}

impl Default for Sd3TextOptions {
    fn default() -> Self {
        Sd3TextOptions {
            use_t5: true,
            max_sequence_length: DEFAULT_MAX_SEQUENCE_LENGTH,
        }
    }
}

/// The three frozen SD3 text encoders.
pub struct Sd3TextEncoders {
    pub clip_l: ClipBranch,
    pub clip_g: ClipBranch,
    pub t5: Option<T5Branch>,
    /// Channel width of the context (T5's `d_model`, the transformer's
    /// `joint_attention_dim`).
    pub context_dim: i64,
    /// Tokens of the T5 part of the context: T5's sequence length, and without T5 the
    /// number of zero tokens in its place (diffusers' `max_sequence_length` either way).
    pub max_sequence_length: usize,
    pub device: Device,
}

/// Whether `model_index.json` (when present) lists a component (non-null entry).
fn pipeline_has(dir: &Path, name: &str) -> Result<bool> {
    let index = dir.join("model_index.json");
    if index.is_file() {
        let mi = crate::models::config::read_json(&index)?;
        return Ok(mi
            .get(name)
            .map(|v| {
                v.as_array()
                    .is_some_and(|a| a.first().is_some_and(|x| x.is_string()))
            })
            .unwrap_or(false));
    }
    Ok(dir.join(name).is_dir())
}

fn load_clip(dir: &Path, enc: &str, tok: &str, device: Device, kind: Kind) -> Result<ClipBranch> {
    let tokenizer =
        ClipTokenizer::from_dir(&dir.join(tok)).with_context(|| format!("loading {tok}/"))?;
    let mut encoder = ClipTextModel::load(&dir.join(enc), device, kind)
        .with_context(|| format!("loading {enc}/"))?;
    ensure!(
        encoder.model.has_projection(),
        "{}: SD3 needs a CLIP text encoder with projection (text_projection.weight)",
        dir.join(enc).display()
    );
    ensure!(
        tokenizer.max_length() as i64 == CLIP_TOKENS,
        "{}: SD3 expects a 77-token CLIP tokenizer, found model_max_length {}",
        dir.join(tok).display(),
        tokenizer.max_length()
    );
    encoder.vs.freeze();
    Ok(ClipBranch {
        tokenizer,
        pad: Pad::Config,
        encoder,
    })
}

impl Sd3TextEncoders {
    /// Load `text_encoder{,_2,_3}/` and `tokenizer{,_2,_3}/` from an SD3 pipeline
    /// folder, frozen, with weights in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind, opts: &Sd3TextOptions) -> Result<Self> {
        let clip_l = load_clip(dir, "text_encoder", "tokenizer", device, kind)?;
        let clip_g = load_clip(dir, "text_encoder_2", "tokenizer_2", device, kind)?;
        let t5 = if opts.use_t5 && pipeline_has(dir, "text_encoder_3")? {
            let tokenizer =
                T5Tokenizer::from_dir(&dir.join("tokenizer_3"), opts.max_sequence_length)
                    .context("loading tokenizer_3/")?;
            let encoder = T5EncoderModel::load(&dir.join("text_encoder_3"), device, kind)
                .context("loading text_encoder_3/")?;
            Some(T5Branch { tokenizer, encoder })
        } else {
            None
        };
        let transformer_cfg = dir.join("transformer").join("config.json");
        let joint = if transformer_cfg.is_file() {
            crate::models::config::read_json(&transformer_cfg)?
                .get("joint_attention_dim")
                .and_then(|v| v.as_i64())
        } else {
            None
        };
        let context_dim = match (&t5, joint) {
            (Some(t), Some(j)) if t.encoder.config.d_model != j => bail!(
                "{}: text_encoder_3 d_model {} differs from the transformer's joint_attention_dim {j}",
                dir.display(),
                t.encoder.config.d_model
            ),
            (Some(t), _) => t.encoder.config.d_model,
            (None, Some(j)) => j,
            (None, None) => 4096,
        };
        Self::assemble(
            clip_l,
            clip_g,
            t5,
            context_dim,
            opts.max_sequence_length,
            device,
        )
    }

    fn assemble(
        clip_l: ClipBranch,
        clip_g: ClipBranch,
        t5: Option<T5Branch>,
        context_dim: i64,
        max_sequence_length: usize,
        device: Device,
    ) -> Result<Self> {
        let clip_width = clip_l.encoder.config.hidden_size + clip_g.encoder.config.hidden_size;
        ensure!(
            clip_width <= context_dim,
            "SD3 text: the CLIP widths {} + {} exceed the context width {context_dim}",
            clip_l.encoder.config.hidden_size,
            clip_g.encoder.config.hidden_size
        );
        Ok(Sd3TextEncoders {
            clip_l,
            clip_g,
            t5,
            context_dim,
            max_sequence_length,
            device,
        })
    }

    /// Random tiny encoders of the real architectures (CLIP-L width 8, CLIP-G width
    /// 16, T5 width 32 with `T5Config::tiny`; pooled width 8 + 16 = 24), with the real
    /// CLIP tokenizer and [`T5Tokenizer::tiny`]: the conditioning fits
    /// `Sd3Config::tiny()`.
    pub fn tiny_random(
        device: Device,
        seed: i64,
        with_t5: bool,
        max_sequence_length: usize,
    ) -> Result<Self> {
        tch::manual_seed(seed);
        let tok_dir = crate::models::tokenizer::builtin_tokenizer_dir();
        let clip = |hidden: i64, layers: i64, act: &str, pad: Pad| -> Result<ClipBranch> {
            let config = ClipTextConfig {
                hidden_size: hidden,
                intermediate_size: 2 * hidden,
                num_hidden_layers: layers,
                num_attention_heads: 2,
                hidden_act: act.to_string(),
                projection_dim: hidden,
                ..ClipTextConfig::tiny()
            };
            let mut vs = nn::VarStore::new(device);
            let model = ClipTextModel::new(&vs.root(), &config, true)?;
            vs.freeze();
            let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
            // SD3's tokenizer_2 is configured with pad_token "!" (id 0).
            let tokenizer = match pad {
                Pad::Zero => tokenizer.with_pad_token("!")?,
                _ => tokenizer,
            };
            Ok(ClipBranch {
                tokenizer,
                pad,
                encoder: LoadedClipText { vs, model, config },
            })
        };
        // SD3's tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0).
        let clip_l = clip(8, 2, "quick_gelu", Pad::Eos)?;
        let clip_g = clip(16, 3, "gelu", Pad::Zero)?;
        let t5_cfg = T5Config::tiny();
        let t5 = if with_t5 {
            let mut vs = nn::VarStore::new(device);
            let model = T5EncoderModel::new(&vs.root(), &t5_cfg)?;
            vs.freeze();
            Some(T5Branch {
                tokenizer: T5Tokenizer::tiny(max_sequence_length)?,
                encoder: LoadedT5 {
                    vs,
                    model,
                    config: t5_cfg.clone(),
                },
            })
        } else {
            None
        };
        Self::assemble(
            clip_l,
            clip_g,
            t5,
            t5_cfg.d_model,
            max_sequence_length,
            device,
        )
    }

    /// Tokens of the context: 77 CLIP tokens plus the T5 tokens (without T5,
    /// `max_sequence_length` zero tokens, as diffusers' `encode_prompt` pads).
    pub fn context_len(&self) -> i64 {
        CLIP_TOKENS
            + self
                .t5
                .as_ref()
                .map_or(self.max_sequence_length as i64, |t| {
                    t.tokenizer.max_length() as i64
                })
    }

    /// The conditioning of `prompts` (no gradient; float32): context
    /// `[B, context_len, context_dim]`, pooled `[B, proj_L + proj_G]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Cond> {
        Ok(self.encode_with_truncation(prompts)?.0)
    }

    /// Like [`Sd3TextEncoders::encode`], also returning the largest number of prompts
    /// truncated by one of the tokenizers.
    pub fn encode_with_truncation(&self, prompts: &[&str]) -> Result<(Cond, usize)> {
        ensure!(!prompts.is_empty(), "SD3 text: no prompts to encode");
        tch::no_grad(|| {
            let mut truncated = 0;
            let mut run_clip = |br: &ClipBranch| -> Result<(Tensor, Tensor)> {
                let (ids, n) = br.tokenizer.encode_padded(prompts, br.pad)?;
                truncated = truncated.max(n);
                let out = br
                    .encoder
                    .model
                    .forward(&ids.to_device(self.device), None)?;
                let pooled = out
                    .text_embeds
                    .as_ref()
                    .context("SD3 text: a CLIP encoder has no projection")?
                    .to_kind(Kind::Float);
                Ok((out.penultimate().to_kind(Kind::Float), pooled))
            };
            let (hl, pl) = run_clip(&self.clip_l)?;
            let (hg, pg) = run_clip(&self.clip_g)?;
            let b = prompts.len() as i64;
            let t5 = match &self.t5 {
                Some(t) => {
                    let (ids, n) = t.tokenizer.encode_padded(prompts)?;
                    truncated = truncated.max(n);
                    t.encoder
                        .model
                        .forward(&ids.to_device(self.device), None)?
                        .to_kind(Kind::Float)
                }
                None => Tensor::zeros(
                    [b, self.max_sequence_length as i64, self.context_dim],
                    (Kind::Float, self.device),
                ),
            };
            let context = join_context(&hl, &hg, &t5)?;
            let pooled = Tensor::cat(&[pl, pg], -1);
            Ok((
                Cond {
                    context,
                    pooled: Some(pooled),
                    time_ids: None,
                },
                truncated,
            ))
        })
    }
}

/// `[pad(cat(clip_l, clip_g, channels), to T5 width); t5]` on the sequence axis.
pub fn join_context(clip_l: &Tensor, clip_g: &Tensor, t5: &Tensor) -> Result<Tensor> {
    let (b, l, dl) = clip_l
        .size3()
        .context("SD3 text: CLIP-L states must be [B, L, D]")?;
    let (bg, lg, dg) = clip_g
        .size3()
        .context("SD3 text: CLIP-G states must be [B, L, D]")?;
    let (bt, _, width) = t5
        .size3()
        .context("SD3 text: T5 states must be [B, L, D]")?;
    ensure!(
        b == bg && l == lg && b == bt,
        "SD3 text: CLIP-L {:?}, CLIP-G {:?} and T5 {:?} states disagree in batch or CLIP length",
        clip_l.size(),
        clip_g.size(),
        t5.size()
    );
    ensure!(
        dl + dg <= width,
        "SD3 text: CLIP widths {dl} + {dg} exceed the T5 width {width}"
    );
    let clip = Tensor::cat(&[clip_l, clip_g], -1).constant_pad_nd([0, width - dl - dg]);
    Ok(Tensor::cat(&[&clip, t5], 1))
}
