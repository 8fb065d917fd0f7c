//! Gradient checkpointing's trade (`--workloads ckpt`): the memory one kept-step
//! recomputation and one VAE decode backward add on top of what is in use before
//! them (weights, gradients: the activations and workspace), and their time, without
//! and with `train.gradient_checkpointing`.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::options::Inputs;
use super::runner::Bench;
use crate::models::checkpoint::Scope;
use crate::models::denoiser::{guided_output, Guidance};

const GIB: f64 = (1u64 << 30) as f64;

/// Measure the kept step and the decode backward, without and with checkpointing.
pub(crate) fn run(b: &mut Bench, cx: &mut Inputs) -> Result<()> {
    let Inputs {
        tr,
        cond,
        uncond,
        x_t,
        plan,
        guidance,
        ..
    } = cx;
    let g = Guidance::new(uncond, cond, *guidance);
    let pipe = &tr.pipe;
    let t = plan.timesteps[plan.len() / 2];
    let x_t = &*x_t;
    // The upstream gradient of the kept step's output and of the decoded images.
    tch::manual_seed(1);
    let w_out = x_t.randn_like();
    let latents = x_t.detach();
    let images = tch::no_grad(|| pipe.to_images(&latents))?;
    let w_img = images.randn_like();
    let zero = |pipe: &crate::models::pipeline::Pipeline| {
        for (_, v) in pipe.backbone_vs().variables() {
            let mut gr = v.grad();
            if gr.defined() {
                let _ = gr.zero_();
            }
        }
    };
    for ckpt in [false, true] {
        if ckpt && !crate::models::checkpoint::available() {
            b.skip(
                "kept_step_grad_ckpt",
                &[],
                "skipped: this binary has no checkpoint binding".into(),
            )?;
            b.skip(
                "vae_decode_grad_ckpt",
                &[],
                "skipped: this binary has no checkpoint binding".into(),
            )?;
            break;
        }
        let suffix = if ckpt { "_ckpt" } else { "" };
        let name = format!("kept_step_grad{suffix}");
        b.measure(&name, &[], || {
            zero(pipe);
            let _scope = Scope::new(ckpt)?;
            let (out, _) = guided_output(pipe.denoiser(), x_t, t, &g)?;
            (out * &w_out).sum(Kind::Double).backward();
            Ok(())
        })?;
        note_added(b)?;
        let name = format!("vae_decode_grad{suffix}");
        b.measure(&name, &[], || {
            let _scope = Scope::new(ckpt)?;
            let z = latents.detach().set_requires_grad(true);
            let img = pipe.to_images(&z)?;
            (img * &w_img).sum(Kind::Double).backward();
            let _: Tensor = z.grad();
            Ok(())
        })?;
        note_added(b)?;
    }
    Ok(())
}

/// Write the memory the last row's runs added (peak less the use at the reset) into
/// its note.
fn note_added(b: &mut Bench) -> Result<()> {
    let before = b.mem.before.get();
    // The checkpointed rows' time ratio is against the same work without it.
    let base = b.report.rows.last().and_then(|r| {
        let plain = r.workload.strip_suffix("_ckpt")?;
        b.report.row(plain, "baseline")?.median_ms
    });
    if let Some(row) = b.report.rows.last_mut() {
        if let Some(base) = base {
            row.ratio = row.median_ms.map(|m| m / base);
        }
        if let (Some(peak), Some(before)) = (row.peak_bytes, before) {
            let added = format!(
                "added {:.2} GiB over {:.2} GiB in use",
                (peak - before) as f64 / GIB,
                before as f64 / GIB
            );
            row.note = Some(match row.note.take() {
                Some(n) => format!("{n}; {added}"),
                None => added,
            });
        }
    }
    b.write_json()
}
