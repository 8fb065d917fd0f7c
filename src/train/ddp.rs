//! The trainer's side of data-parallel training: joining the process group from the
//! launch environment and the configuration, and attaching [`Ddp`] to a [`Trainer`]
//! with its state made identical on every rank (see [`crate::dist`]).

use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

use crate::dist::{Ddp, Launch, ProcessGroup};
use crate::train::adt::Trainer;
use crate::train::config::Config;
use crate::train::optim::AdamW;

/// Join the process group when this process was launched as one rank of several
/// (torchrun, SLURM or `adt train --nproc`): picks the backend (`train.dist_backend`;
/// "auto" is NCCL on CUDA, Gloo on the CPU) and puts a CUDA run on cuda:LOCAL_RANK.
pub fn setup(cfg: &mut Config) -> Result<Option<Arc<ProcessGroup>>> {
    let Some(l) = Launch::from_env()? else {
        return Ok(None);
    };
    let t = &mut cfg.train;
    let cuda = t.device.starts_with("cuda");
    if t.device == "cuda" {
        t.device = format!("cuda:{}", l.local_rank);
    }
    let backend = match t.dist_backend.as_str() {
        "auto" if cuda => "nccl",
        "auto" => "gloo",
        b => b,
    }
    .to_string();
    if backend == "nccl" && !cuda {
        bail!("train.dist_backend = \"nccl\" needs train.device = \"cuda\"");
    }
    let timeout = Duration::from_secs_f64(t.dist_timeout_s);
    tracing::info!(
        "rank {} of {} (local rank {}, launched by {}), {backend} rendezvous at {}:{}",
        l.rank,
        l.world,
        l.local_rank,
        l.launcher,
        l.master_addr,
        l.master_port
    );
    Ok(Some(ProcessGroup::init(&l, &backend, timeout)?))
}

/// Attach data-parallel training to `tr`: gradient reducers for G and D, and the
/// whole trainable state made identical on every rank (rank 0's), checked by a
/// checksum all-reduce.
pub fn attach(tr: &mut Trainer, pg: &Arc<ProcessGroup>) -> Result<()> {
    let sorted = |vs: &tch::nn::VarStore| -> Vec<Tensor> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t).collect()
    };
    let mut g_state = sorted(tr.pipe.backbone_vs());
    if let Some(ema) = &tr.ema {
        g_state.extend(ema.iter().map(|(_, t)| t.shallow_clone()));
    }
    let opt_state = |o: &AdamW, p: &str| -> Vec<Tensor> {
        o.state(p)
            .into_iter()
            .filter(|(n, _)| !n.ends_with(".step"))
            .map(|(_, t)| t)
            .collect()
    };
    let mut o_state = opt_state(&tr.opt_g, "g");
    let (mut d_state, mut d_buffers) = (Vec::new(), Vec::new());
    if let Some(d) = &tr.disc {
        d_state = sorted(&d.vs);
        d_state.extend(sorted(&d.dual_vs));
        d_buffers = sorted(&d.vs)
            .into_iter()
            .filter(|t| !t.requires_grad())
            .collect();
    }
    if let Some(o) = &tr.opt_d {
        o_state.extend(opt_state(o, "d"));
    }
    let ddp = Ddp::new(
        pg,
        tr.opt_g.params(),
        tr.opt_d.as_ref().map(|o| o.params()),
        d_buffers,
    )?;
    ddp.broadcast_and_verify("generator weights", &g_state)?;
    ddp.broadcast_and_verify("discriminator weights", &d_state)?;
    ddp.broadcast_and_verify("optimiser states", &o_state)?;
    // Step counters must agree too (they come from the same checkpoint).
    let steps = Tensor::from_slice(&[tr.step as i64, tr.g_steps as i64]).to_device(pg.device);
    ddp.broadcast_and_verify("step counters", &[steps])?;
    tracing::info!(
        "rank {}: state identical across {} ranks; gradient buckets: G {}, D {}",
        pg.rank,
        pg.world,
        ddp.g.buckets(),
        ddp.d.as_ref().map(|r| r.buckets()).unwrap_or(0)
    );
    tr.ddp = Some(ddp);
    Ok(())
}
