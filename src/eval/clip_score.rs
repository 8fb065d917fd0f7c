//! CLIP score of generated images against their prompts.
//!
//! For each image, `100 * max(cos(image_embeds, text_embeds), 0)` with the embeddings
//! of a transformers `CLIPModel` folder (config.json with `text_config` /
//! `vision_config`, model.safetensors, the tokenizer files and, when present,
//! preprocessor_config.json); the CLIP score of a set is the mean over its images.
//! This is the definition in torchmetrics' documentation. torchmetrics' code
//! clamps the mean instead of each image (`max(mean(100 * cos), 0)`); the two agree
//! whenever no cosine is negative, which is the case for trained CLIP models on real
//! images.
//!
//! Text: the folder's CLIP tokenizer (`vocab.json` + `merges.txt`, else
//! `tokenizer.json`; in the folder itself or its `tokenizer/`), rows
//! `[BOS] + ids[..75] + [EOS]` padded with the configured pad token (prompts longer
//! than 75 tokens are cut, keeping the end-of-text token), the text tower with its
//! projection. Images: [`ClipImageProcessor`] (transformers' PIL-backed
//! `CLIPImageProcessor`), the vision tower with its projection. Float32.
//!
//! The prompt of each image comes from the image folder: `prompts.jsonl` (lines
//! `{"file": "00000.png", "prompt": "..."}`, written by `adt sample`), or an
//! imagefolder `metadata.jsonl` (`file_name` and a `text`, `caption` or `prompt`
//! column).

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::clip_vision::{
    load_rgb8, vision_load_options, ClipImageProcessor, ClipVisionConfig, ClipVisionModel,
};
use crate::models::tokenizer::{ClipTokenizer, Pad};
use crate::weights;

/// Name of the image -> prompt index that `adt sample` writes next to its images.
pub const PROMPTS_FILE: &str = "prompts.jsonl";

/// Caption columns of an imagefolder `metadata.jsonl`, in order of preference.
const CAPTION_COLUMNS: &[&str] = &["text", "caption", "prompt"];

/// A full CLIP model (both towers with their projections, the tokenizer and the
/// image preprocessing), loaded from a transformers `CLIPModel` folder.
pub struct ClipScorer {
    pub vs: VarStore,
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
    pub tokenizer: ClipTokenizer,
    pub processor: ClipImageProcessor,
    /// The stored `logit_scale` (the logits are `exp(logit_scale) * cos`).
    pub logit_scale: Tensor,
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    path: PathBuf,
}

fn find_tokenizer_dir(dir: &Path) -> Result<PathBuf> {
    for d in [dir.to_path_buf(), dir.join("tokenizer")] {
        let files = (d.join("vocab.json").is_file() && d.join("merges.txt").is_file())
            || d.join("tokenizer.json").is_file();
        if files {
            return Ok(d);
        }
    }
    bail!(
        "{}: no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json) in the folder or its tokenizer/",
        dir.display()
    )
}

impl ClipScorer {
    /// Load a `CLIPModel` folder. Every tensor of the weights must be used (both
    /// towers, both projections and `logit_scale`); errors name the tensor.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let v = crate::models::config::read_json(&config_path)?;
        ensure!(
            v.get("text_config").is_some() && v.get("vision_config").is_some(),
            "{}: not a CLIPModel config (the CLIP score needs both towers: text_config and vision_config)",
            config_path.display()
        );
        let mut text_config = ClipTextConfig::from_file(&config_path)?;
        let (vision_config, _) = ClipVisionConfig::from_file(&config_path)?;
        // Both projections have the model's top-level width.
        text_config.projection_dim = vision_config.projection_dim;
        let files = weights::find_weight_files(dir, &["model"], Some("fp16"))?;
        let mut names = Vec::new();
        for f in &files {
            names.extend(weights::tensor_names(f)?);
        }
        let mut vs = VarStore::new(device);
        let root = vs.root();
        let text = ClipTextModel::new(&root, &text_config, true)
            .with_context(|| format!("building the CLIP text tower of {}", dir.display()))?;
        let vision = ClipVisionModel::new(&root, &vision_config, true)
            .with_context(|| format!("building the CLIP vision tower of {}", dir.display()))?;
        let logit_scale = root.zeros("logit_scale", &[]);
        let mut opts = vision_load_options(&names, false);
        opts.ignore
            .push("text_model.embeddings.position_ids".into());
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        let tokenizer = ClipTokenizer::from_dir(&find_tokenizer_dir(dir)?)?;
        ensure!(
            tokenizer.max_length() as i64 <= text_config.max_position_embeddings,
            "{}: the tokenizer's rows of {} tokens exceed max_position_embeddings {}",
            dir.display(),
            tokenizer.max_length(),
            text_config.max_position_embeddings
        );
        let processor = ClipImageProcessor::from_dir(dir, vision_config.image_size as u32)?;
        Ok(ClipScorer {
            vs,
            text,
            vision,
            tokenizer,
            processor,
            logit_scale,
            text_config,
            vision_config,
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn device(&self) -> Device {
        self.vs.device()
    }

    /// Projected text embeddings [N, P] of `prompts` (not normalised).
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        ensure!(!prompts.is_empty(), "no prompts to embed");
        let (ids, _) = self.tokenizer.encode_padded(prompts, Pad::Config)?;
        self.text_embeds_from_ids(&ids)
    }

    /// Projected text embeddings [N, P] of token rows [N, S].
    pub fn text_embeds_from_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let out = tch::no_grad(|| self.text.forward(&ids.to_device(self.device()), None))?;
        out.text_embeds
            .context("the CLIP text tower has no projection")
    }

    /// `pixel_values` [N, 3, S, S] of RGB images.
    pub fn pixel_values(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        ensure!(!images.is_empty(), "no images to preprocess");
        let s = self.vision.image_size();
        let mut rows = Vec::with_capacity(images.len());
        for img in images {
            let x = self.processor.preprocess(img)?;
            ensure!(
                x.size()[1..] == [s, s],
                "CLIP preprocessing gives {:?} pixels, the vision tower needs {s}x{s} (check crop_size in preprocessor_config.json)",
                &x.size()[1..]
            );
            rows.push(x);
        }
        Ok(Tensor::stack(&rows, 0))
    }

    /// Projected image embeddings [N, P] of normalised `pixel_values` [N, 3, S, S].
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let out = tch::no_grad(|| self.vision.forward(pixel_values))?;
        out.image_embeds
            .context("the CLIP vision tower has no projection")
    }

    /// Projected image embeddings [N, P] of RGB images.
    pub fn image_embeds(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        self.image_embeds_from_pixels(&self.pixel_values(images)?)
    }

    /// Cosine similarity of each image with its prompt, [N] float32 on the CPU.
    pub fn cosines(&self, images: &[image::RgbImage], prompts: &[&str]) -> Result<Tensor> {
        ensure!(
            images.len() == prompts.len(),
            "{} images but {} prompts",
            images.len(),
            prompts.len()
        );
        let img = self.image_embeds(images)?;
        let txt = self.text_embeds(prompts)?;
        Ok(pair_cosine(&img, &txt).to_device(Device::Cpu))
    }
}

/// Row-wise cosine similarity of two [N, D] tensors, as transformers computes it
/// for CLIP's logits: each row divided by its L2 norm, then the dot product.
pub fn pair_cosine(a: &Tensor, b: &Tensor) -> Tensor {
    let na = a / a.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    let nb = b / b.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
    (na * nb).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
}

/// `100 * max(cos, 0)`.
pub fn score_of_cosine(cos: f64) -> f64 {
    100.0 * cos.max(0.0)
}

/// Score of one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageScore {
    pub file: String,
    pub prompt: String,
    pub cosine: f64,
    /// `100 * max(cosine, 0)`.
    pub score: f64,
}

/// CLIP scores of a set of images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipScoreReport {
    /// The CLIP model folder.
    pub model: String,
    pub images: Vec<ImageScore>,
    /// Mean of the per-image scores.
    pub mean: f64,
}

fn caption_of(v: &serde_json::Value) -> Option<&str> {
    CAPTION_COLUMNS
        .iter()
        .find_map(|c| v.get(*c).and_then(|t| t.as_str()))
}

/// Read the JSON lines of `path` as (image file, prompt) pairs, the file under
/// `file_key` and the prompt under `caption` (or any caption column when None).
fn read_index(
    path: &Path,
    file_key: &str,
    caption: Option<&str>,
) -> Result<HashMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let file = v
            .get(file_key)
            .and_then(|f| f.as_str())
            .with_context(|| format!("{}: no string field \"{file_key}\"", at()))?;
        let prompt = match caption {
            Some(c) => v.get(c).and_then(|t| t.as_str()),
            None => caption_of(&v),
        }
        .with_context(|| {
            format!(
                "{}: no prompt (string field {})",
                at(),
                match caption {
                    Some(c) => format!("\"{c}\""),
                    None => CAPTION_COLUMNS.join(" / "),
                }
            )
        })?;
        map.insert(normalize_rel(file), prompt.to_string());
    }
    Ok(map)
}

fn normalize_rel(p: &str) -> String {
    p.trim_start_matches("./").replace('\\', "/")
}

/// The prompt of every image of `dir`, by path relative to `dir`: from
/// `prompts.jsonl` (`file`, `prompt`), else from `metadata.jsonl` (`file_name`, and a
/// `text` / `caption` / `prompt` column).
pub fn read_prompts(dir: &Path) -> Result<HashMap<String, String>> {
    let p = dir.join(PROMPTS_FILE);
    if p.is_file() {
        return read_index(&p, "file", Some("prompt"));
    }
    let m = dir.join("metadata.jsonl");
    if m.is_file() {
        return read_index(&m, "file_name", None);
    }
    bail!(
        "{}: the CLIP score needs the prompt of each image, but the folder has neither {PROMPTS_FILE} (written by adt sample) nor a metadata.jsonl with a {} column",
        dir.display(),
        CAPTION_COLUMNS.join(" / ")
    )
}

/// The prompts of `files` (images inside `dir`), from [`read_prompts`].
pub fn prompts_for(dir: &Path, files: &[PathBuf]) -> Result<Vec<String>> {
    let map = read_prompts(dir)?;
    files
        .iter()
        .map(|f| {
            let rel = f.strip_prefix(dir).unwrap_or(f);
            let key = normalize_rel(&rel.to_string_lossy());
            map.get(&key).cloned().with_context(|| {
                format!(
                    "{}: no prompt for this image (no entry \"{key}\" in {} / metadata.jsonl of {})",
                    f.display(),
                    PROMPTS_FILE,
                    dir.display()
                )
            })
        })
        .collect()
}

/// CLIP score of the images `files` of folder `dir` against their prompts, with the
/// `CLIPModel` folder `clip_dir`, `batch_size` images at a time.
pub fn clip_score_files(
    clip_dir: &Path,
    dir: &Path,
    files: &[PathBuf],
    device: Device,
    batch_size: usize,
) -> Result<ClipScoreReport> {
    ensure!(!files.is_empty(), "{}: no images to score", dir.display());
    // Prompts first, so that a missing index fails before the model loads.
    let prompts = prompts_for(dir, files)?;
    let scorer = ClipScorer::load(clip_dir, device)
        .with_context(|| format!("loading the CLIP model {}", clip_dir.display()))?;
    score_with(&scorer, files, &prompts, batch_size)
}

/// CLIP scores of image files against prompts (one per file) with a loaded model.
pub fn score_with(
    scorer: &ClipScorer,
    files: &[PathBuf],
    prompts: &[String],
    batch_size: usize,
) -> Result<ClipScoreReport> {
    ensure!(
        files.len() == prompts.len(),
        "{} images but {} prompts",
        files.len(),
        prompts.len()
    );
    ensure!(!files.is_empty(), "no images to score");
    let bs = batch_size.max(1);
    let mut images = Vec::with_capacity(files.len());
    for (chunk, texts) in files.chunks(bs).zip(prompts.chunks(bs)) {
        let imgs = chunk
            .iter()
            .map(|f| load_rgb8(f))
            .collect::<Result<Vec<_>>>()?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let cos = scorer.cosines(&imgs, &texts)?;
        ensure!(
            cos.isfinite().all().int64_value(&[]) != 0,
            "CLIP cosines of {} .. are not finite",
            chunk[0].display()
        );
        for (i, (f, p)) in chunk.iter().zip(texts.iter()).enumerate() {
            let c = cos.double_value(&[i as i64]);
            images.push(ImageScore {
                file: f.display().to_string(),
                prompt: p.to_string(),
                cosine: c,
                score: score_of_cosine(c),
            });
        }
    }
    let mean = images.iter().map(|s| s.score).sum::<f64>() / images.len() as f64;
    Ok(ClipScoreReport {
        model: scorer.path().display().to_string(),
        images,
        mean,
    })
}
