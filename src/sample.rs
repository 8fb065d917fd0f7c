//! Image generation with the inference sampler, and image grids.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

use crate::models::denoiser::{guided_output, Guidance};
use crate::models::pipeline::{Family, Pipeline};
use crate::schedule::{sample_loop, Plan, SamplerKind};

/// Generate one image per prompt at `resolution` pixels with classifier-free
/// guidance `cfg`; images in [-1, 1], [B, 3, H, W]. Deterministic for a seed.
/// Works for every backbone: UNet pipelines with the DDIM / DPM-Solver++ samplers,
/// SD3 with the flow-matching Euler sampler (16-channel latents, pure noise at
/// sigma = 1).
pub fn generate(
    pipe: &Pipeline,
    plan: &Plan,
    prompts: &[String],
    cfg: f64,
    seed: i64,
    resolution: i64,
) -> Result<Tensor> {
    Ok(generate_unclamped(pipe, plan, prompts, cfg, seed, resolution)?.clamp(-1.0, 1.0))
}

/// [`generate`] before the final clamp to [-1, 1]: the decoded images as the
/// discriminator scores them in training.
pub fn generate_unclamped(
    pipe: &Pipeline,
    plan: &Plan,
    prompts: &[String],
    cfg: f64,
    seed: i64,
    resolution: i64,
) -> Result<Tensor> {
    ensure!(
        cfg.is_finite(),
        "guidance scale {cfg} is not a finite number"
    );
    let flow_plan = plan.kind == SamplerKind::FlowEuler;
    ensure!(
        flow_plan == pipe.is_flow(),
        "sampler {:?} does not fit this {:?} pipeline ({})",
        plan.kind,
        pipe.family,
        if pipe.is_flow() {
            "a flow-matching model: use the flow sampler"
        } else {
            "a DDPM-schedule model: use ddim or dpmpp"
        }
    );
    let lat = resolution / pipe.vae_scale();
    ensure!(
        lat > 0 && lat * pipe.vae_scale() == resolution,
        "resolution {resolution} must be a positive multiple of the VAE downscale {}",
        pipe.vae_scale()
    );
    tch::no_grad(|| {
        let b = prompts.len() as i64;
        let r = resolution;
        let time_ids = Tensor::from_slice(&[r as f32, r as f32, 0.0, 0.0, r as f32, r as f32])
            .view([1, 6])
            .repeat([b, 1]);
        let ids = (pipe.family == Family::Sdxl).then_some(&time_ids);
        let (cond, _) = pipe.encode_text(prompts, ids)?;
        let (uncond, _) = pipe.encode_text(&vec![String::new(); prompts.len()], ids)?;
        let g = Guidance::new(&uncond, &cond, cfg);
        let c = pipe.latent_channels();
        let gen_device = tch::Device::Cpu;
        tch::manual_seed(seed);
        let x_t = Tensor::randn([b, c, lat, lat], (Kind::Float, gen_device)).to_device(pipe.device);
        // Every sampler starts from unit-scale noise: DDPM x_T ~ N(0, I), and flow
        // matching at sigma_max = 1 (the shift maps 1 to 1).
        let den = pipe.denoiser();
        let mut err = None;
        let z = sample_loop(
            plan,
            0,
            x_t,
            |x, t, _| match guided_output(den, x, t, &g) {
                Ok((o, _)) => o,
                Err(e) => {
                    err.get_or_insert(e);
                    x.zeros_like()
                }
            },
            |_, _| {},
        );
        if let Some(e) = err {
            return Err(e);
        }
        let images = pipe.to_images(&z)?;
        // NaN would be written as black images: refuse them.
        let bad = images
            .isfinite()
            .logical_not()
            .sum(Kind::Int64)
            .int64_value(&[]);
        ensure!(
            bad == 0,
            "{bad} of {} generated values are NaN or infinite (non-finite weights, or a \
             diverging sampler / guidance scale {cfg}); no image written",
            images.numel()
        );
        Ok(images)
    })
}

/// [B, 3, H, W] in [-1, 1] to 8-bit RGB images.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    let x = ((images
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        + 1.0)
        * 127.5)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let s = x.size();
    let (b, h, w) = (s[0], s[1] as u32, s[2] as u32);
    let mut out = Vec::new();
    for i in 0..b {
        let t = x.get(i);
        let mut buf = vec![0u8; (h * w * 3) as usize];
        let len = buf.len();
        t.copy_data_u8(&mut buf, len);
        out.push(image::RgbImage::from_raw(w, h, buf).context("image buffer size")?);
    }
    Ok(out)
}

/// Save images as `dir/00000.png`, `dir/00001.png`, ... and write `dir/prompts.jsonl`,
/// one line `{"file": "00000.png", "prompt": "..."}` per image (the index that
/// `adt eval --clip` reads); `prompts[i]` is the prompt of image i.
pub fn save_images(images: &Tensor, dir: &Path, prompts: &[String]) -> Result<()> {
    let imgs = to_rgb8(images)?;
    ensure!(
        imgs.len() == prompts.len(),
        "{} images but {} prompts",
        imgs.len(),
        prompts.len()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut index = String::new();
    for (i, (im, prompt)) in imgs.iter().zip(prompts).enumerate() {
        let name = format!("{i:05}.png");
        let p = dir.join(&name);
        im.save(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        index.push_str(&serde_json::json!({ "file": name, "prompt": prompt }).to_string());
        index.push('\n');
    }
    crate::weights::atomic_write(&dir.join("prompts.jsonl"), index.as_bytes())
}

/// Save images as a grid PNG with `cols` columns (2 px white gutters).
pub fn save_grid(images: &Tensor, path: &Path, cols: usize) -> Result<()> {
    let imgs = to_rgb8(images)?;
    let n = imgs.len().max(1);
    let cols = cols.clamp(1, n);
    let rows = n.div_ceil(cols);
    let (w, h) = imgs.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let g = 2;
    let mut grid = image::RgbImage::from_pixel(
        cols as u32 * (w + g) + g,
        rows as u32 * (h + g) + g,
        image::Rgb([255, 255, 255]),
    );
    for (k, im) in imgs.iter().enumerate() {
        let (r, c) = ((k / cols) as u32, (k % cols) as u32);
        image::imageops::replace(
            &mut grid,
            im,
            (g + c * (w + g)) as i64,
            (g + r * (h + g)) as i64,
        );
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    grid.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
