//! Scheduler configuration, read from a diffusers `scheduler_config.json` or built
//! from presets.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
    /// Not a DDPM schedule: flow matching x_t = (1 - t) x0 + t eps.
    FlowMatching,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
    /// Flow-matching velocity eps - x0.
    Flow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The inference samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    /// DDIM, eta = 0.
    Ddim,
    /// DPM-Solver++ (2M): multistep, data prediction, midpoint, lower-order final.
    #[serde(alias = "dpmpp", alias = "dpmpp2m", alias = "dpm_solver_pp_2m")]
    DpmSolverPp2m,
    /// Flow-matching Euler (SD3).
    #[serde(alias = "flow", alias = "euler")]
    FlowEuler,
}

impl std::str::FromStr for SamplerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ddim" => SamplerKind::Ddim,
            "dpmpp" | "dpmpp2m" | "dpm_solver_pp_2m" | "dpm++" => SamplerKind::DpmSolverPp2m,
            "flow" | "flow_euler" | "euler" => SamplerKind::FlowEuler,
            _ => bail!("unknown sampler {s:?}: expected one of ddim, dpmpp, flow"),
        })
    }
}

/// The noise schedule of a model plus the sampler options that diffusers keeps in
/// the same file. Field names follow diffusers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: Prediction,
    pub timestep_spacing: Spacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub solver_order: usize,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    /// DPM-Solver: "zero" or "sigma_min".
    pub final_sigmas_type: String,
    /// Flow matching timestep shift (SD3: 3.0).
    pub shift: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::sd15()
    }
}

impl ScheduleConfig {
    /// Stable Diffusion 1.x / 2.x / XL DDPM schedule (scaled_linear 0.00085..0.012).
    pub fn sd15() -> Self {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: Prediction::Epsilon,
            timestep_spacing: Spacing::Leading,
            steps_offset: 1,
            set_alpha_to_one: false,
            solver_order: 2,
            lower_order_final: true,
            euler_at_final: false,
            final_sigmas_type: "zero".into(),
            shift: 1.0,
        }
    }

    /// Stable Diffusion 3 flow matching (shift 3.0).
    pub fn sd3() -> Self {
        ScheduleConfig {
            beta_schedule: BetaSchedule::FlowMatching,
            prediction_type: Prediction::Flow,
            shift: 3.0,
            ..ScheduleConfig::sd15()
        }
    }

    pub fn final_sigmas_zero(&self) -> bool {
        self.final_sigmas_type == "zero"
    }

    /// The complete `scheduler_config.json` that diffusers 0.42.1 saves for `class`
    /// (`DDIMScheduler` or `FlowMatchEulerDiscreteScheduler`) with this schedule: every
    /// key of that class, none of another's. DDIM gets `clip_sample: false` (this
    /// sampler never clips; diffusers would default to clipping) and no thresholding.
    pub fn to_diffusers_config(&self, class: &str) -> Result<serde_json::Value> {
        let v = match class {
            "DDIMScheduler" => {
                ensure!(
                    self.beta_schedule != BetaSchedule::FlowMatching
                        && self.prediction_type != Prediction::Flow,
                    "a flow-matching schedule cannot be written as a DDIMScheduler config"
                );
                serde_json::json!({
                    "_class_name": class,
                    "_diffusers_version": crate::json::DIFFUSERS_VERSION,
                    "beta_end": self.beta_end,
                    "beta_schedule": serde_json::to_value(self.beta_schedule)?,
                    "beta_start": self.beta_start,
                    "clip_sample": false,
                    "clip_sample_range": 1.0,
                    "dynamic_thresholding_ratio": 0.995,
                    "num_train_timesteps": self.num_train_timesteps,
                    "prediction_type": serde_json::to_value(self.prediction_type)?,
                    "rescale_betas_zero_snr": false,
                    "sample_max_value": 1.0,
                    "set_alpha_to_one": self.set_alpha_to_one,
                    "steps_offset": self.steps_offset,
                    "thresholding": false,
                    "timestep_spacing": serde_json::to_value(self.timestep_spacing)?,
                    "trained_betas": null
                })
            }
            "FlowMatchEulerDiscreteScheduler" => {
                ensure!(
                    self.prediction_type == Prediction::Flow,
                    "only a flow-matching schedule can be written as a FlowMatchEulerDiscreteScheduler config"
                );
                serde_json::json!({
                    "_class_name": class,
                    "_diffusers_version": crate::json::DIFFUSERS_VERSION,
                    "base_image_seq_len": 256,
                    "base_shift": 0.5,
                    "invert_sigmas": false,
                    "max_image_seq_len": 4096,
                    "max_shift": 1.15,
                    "num_train_timesteps": self.num_train_timesteps,
                    "shift": self.shift,
                    "shift_terminal": null,
                    "stochastic_sampling": false,
                    "time_shift_type": "exponential",
                    "use_beta_sigmas": false,
                    "use_dynamic_shifting": false,
                    "use_exponential_sigmas": false,
                    "use_karras_sigmas": false
                })
            }
            _ => bail!("cannot write a scheduler config for {class:?} (DDIMScheduler or FlowMatchEulerDiscreteScheduler)"),
        };
        Ok(v)
    }

    /// Read a diffusers `scheduler_config.json` (DDIM, DPMSolverMultistep,
    /// FlowMatchEulerDiscrete, PNDM, Euler... any DDPM-family file gives the schedule).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::json::read_json(path)?;
        Self::from_json(&v)
            .with_context(|| format!("{}: unsupported scheduler config", path.display()))
    }

    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let class = v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
        let mut cfg = if class.starts_with("FlowMatch") {
            Self::sd3()
        } else {
            Self::sd15()
        };
        let f = |k: &str| v.get(k).filter(|x| !x.is_null());
        if let Some(x) = f("num_train_timesteps") {
            cfg.num_train_timesteps =
                x.as_u64()
                    .context("num_train_timesteps: expected an integer")? as usize;
        }
        if let Some(x) = f("beta_start") {
            cfg.beta_start = x.as_f64().context("beta_start: expected a number")?;
        }
        if let Some(x) = f("beta_end") {
            cfg.beta_end = x.as_f64().context("beta_end: expected a number")?;
        }
        if !class.starts_with("FlowMatch") {
            if let Some(x) = f("beta_schedule") {
                cfg.beta_schedule = serde_json::from_value(x.clone()).map_err(|_| {
                    anyhow::anyhow!("beta_schedule: {x} is not supported (linear, scaled_linear, squaredcos_cap_v2)")
                })?;
            }
            if let Some(x) = f("prediction_type") {
                cfg.prediction_type = serde_json::from_value(x.clone()).map_err(|_| {
                    anyhow::anyhow!("prediction_type: {x} is not supported (epsilon, v_prediction)")
                })?;
            }
            if let Some(x) = f("trained_betas") {
                bail!("trained_betas: explicit beta tables ({x}) are not supported");
            }
            if f("rescale_betas_zero_snr").and_then(|x| x.as_bool()) == Some(true) {
                bail!("rescale_betas_zero_snr: true is not supported");
            }
        }
        if let Some(x) = f("timestep_spacing") {
            cfg.timestep_spacing = serde_json::from_value(x.clone()).map_err(|_| {
                anyhow::anyhow!(
                    "timestep_spacing: {x} is not supported (leading, trailing, linspace)"
                )
            })?;
        }
        if let Some(x) = f("steps_offset") {
            cfg.steps_offset = x.as_u64().context("steps_offset: expected an integer")? as usize;
        }
        if let Some(x) = f("set_alpha_to_one") {
            cfg.set_alpha_to_one = x
                .as_bool()
                .context("set_alpha_to_one: expected a boolean")?;
        }
        if let Some(x) = f("solver_order") {
            cfg.solver_order = x.as_u64().context("solver_order: expected an integer")? as usize;
        }
        if let Some(x) = f("lower_order_final") {
            cfg.lower_order_final = x
                .as_bool()
                .context("lower_order_final: expected a boolean")?;
        }
        if let Some(x) = f("euler_at_final") {
            cfg.euler_at_final = x.as_bool().context("euler_at_final: expected a boolean")?;
        }
        if let Some(x) = f("final_sigmas_type") {
            cfg.final_sigmas_type = x
                .as_str()
                .context("final_sigmas_type: expected a string")?
                .to_string();
        }
        if let Some(x) = f("shift") {
            cfg.shift = x.as_f64().context("shift: expected a number")?;
        }
        if class.starts_with("DPMSolver") {
            if let Some(a) = f("algorithm_type").and_then(|x| x.as_str()) {
                if a != "dpmsolver++" {
                    bail!("algorithm_type: {a:?} is not supported (dpmsolver++)");
                }
            }
            if let Some(a) = f("solver_type").and_then(|x| x.as_str()) {
                if a != "midpoint" {
                    bail!("solver_type: {a:?} is not supported (midpoint)");
                }
            }
            for k in [
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "thresholding",
            ] {
                if f(k).and_then(|x| x.as_bool()) == Some(true) {
                    bail!("{k}: true is not supported");
                }
            }
        }
        if class.starts_with("FlowMatch") {
            for k in [
                "use_dynamic_shifting",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "invert_sigmas",
                "stochastic_sampling",
            ] {
                if f(k).and_then(|x| x.as_bool()) == Some(true) {
                    bail!("{k}: true is not supported");
                }
            }
            if let Some(x) = f("shift_terminal") {
                bail!("shift_terminal: {x} is not supported");
            }
        }
        Ok(cfg)
    }

    /// Check that this schedule can drive `kind`.
    pub fn validate_for(&self, kind: SamplerKind) -> Result<()> {
        let flow_sched = self.beta_schedule == BetaSchedule::FlowMatching;
        match kind {
            SamplerKind::FlowEuler if !flow_sched => {
                bail!(
                    "sampler flow needs a flow-matching model (this schedule is {:?})",
                    self.beta_schedule
                )
            }
            SamplerKind::Ddim | SamplerKind::DpmSolverPp2m if flow_sched => {
                bail!("sampler {kind:?} needs a DDPM schedule; flow-matching models use sampler = \"flow\"")
            }
            _ => {}
        }
        if !flow_sched && self.prediction_type == Prediction::Flow {
            bail!("prediction_type flow needs a flow-matching schedule");
        }
        if self.num_train_timesteps == 0 {
            bail!("num_train_timesteps must be positive");
        }
        if kind == SamplerKind::DpmSolverPp2m && !(1..=2).contains(&self.solver_order) {
            bail!(
                "solver_order: {} is not supported (1 or 2)",
                self.solver_order
            );
        }
        Ok(())
    }
}
