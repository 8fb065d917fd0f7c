//! Sampling workloads: one guided backbone call (`unet_cfg_step` /
//! `transformer_cfg_step`) and a whole sampling run plus the VAE decode
//! (`sample_ddim50` / `sample_flow28`), without gradient.

use anyhow::Result;

use super::options::{Inputs, Lever, Workload};
use super::runner::{trajectory_for, Bench};
use crate::models::denoiser::{guided_output, Denoiser, Guidance};
use crate::train::config::GradPath;
use crate::train::path::rollout;

/// Measure workload `w` (`UnetCfgStep` or `Sample`) for each lever set.
pub(crate) fn run(
    b: &mut Bench,
    cx: &mut Inputs,
    w: Workload,
    variants: &[Vec<Lever>],
) -> Result<()> {
    let Inputs {
        tr,
        cond,
        uncond,
        x_t,
        plan,
        sd3,
        guidance,
        steps,
        ..
    } = cx;
    let (sd3, steps, guidance) = (*sd3, *steps, *guidance);
    let name = match (w == Workload::UnetCfgStep, sd3) {
        (true, false) => "unet_cfg_step".to_string(),
        (true, true) => "transformer_cfg_step".to_string(),
        (false, false) => format!("sample_ddim{}", steps),
        (false, true) => format!("sample_flow{}", steps),
    };
    let name = name.as_str();
    for levers in variants {
        if let Some(why) = b.unsupported(levers) {
            b.skip(name, levers, why)?;
            continue;
        }
        let (fast, fast_sd3) = trajectory_for(&tr.pipe, levers)?;
        let den: &dyn Denoiser = match (&fast, &fast_sd3) {
            (Some(f), _) => f,
            (None, Some(f)) => f,
            (None, None) => tr.pipe.denoiser(),
        };
        let g = Guidance::new(uncond, cond, guidance);
        let pipe = &tr.pipe;
        let plan = &*plan;
        let x_t = &*x_t;
        b.measure(name, levers, || {
            tch::no_grad(|| -> Result<()> {
                if w == Workload::UnetCfgStep {
                    let _ = guided_output(den, x_t, plan.timesteps[0], &g)?;
                } else {
                    let r = rollout(den, plan, 0, x_t, &[], &g, GradPath::Adt)?;
                    let _ = pipe.to_images(&r.final_x)?;
                }
                Ok(())
            })
        })?;
    }
    Ok(())
}
