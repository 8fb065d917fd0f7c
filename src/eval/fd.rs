//! Frechet distance (FD, as in FID) and kernel inception distance (KID) between two
//! sets of feature vectors.
//!
//! Statistics are kept in float64: the mean `mu` and the unbiased covariance `sigma`
//! (divisor N - 1, as `numpy.cov`). [`FeatureAccumulator`] builds them from batches
//! by summing shifted features and their outer products (shifted by the first
//! batch's mean, which keeps the sums well conditioned), so large sets never need to
//! be held in memory.
//!
//! `FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`. The trace of the square
//! root is computed from the symmetric form `tr sqrt(S1^1/2 S2 S1^1/2)` (same
//! eigenvalues as `S1 S2`), both square roots by `linalg_eigh` in float64 with
//! eigenvalues clamped at 0. Guard, as pytorch-fid: if the computation fails or gives
//! a non-finite value (near-singular products), it is repeated with `eps * I` added
//! to both covariances (eps = 1e-6).

use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Offset added to both covariances by the guard.
pub const FD_EPS: f64 = 1e-6;

/// Mean and covariance of a feature set (float64, CPU).
#[derive(Debug)]
pub struct GaussianStats {
    /// `[D]`
    pub mu: Tensor,
    /// `[D, D]`
    pub sigma: Tensor,
    /// Number of samples they were computed from.
    pub n: i64,
}

impl Clone for GaussianStats {
    fn clone(&self) -> Self {
        GaussianStats {
            mu: self.mu.copy(),
            sigma: self.sigma.copy(),
            n: self.n,
        }
    }
}

impl GaussianStats {
    /// Statistics of a feature matrix `[N, D]` (N >= 2).
    pub fn from_features(features: &Tensor) -> Result<Self> {
        let mut acc = FeatureAccumulator::new();
        acc.add(features)?;
        acc.stats()
    }

    pub fn dim(&self) -> i64 {
        self.mu.size()[0]
    }

    /// Save as safetensors with tensors `mu`, `sigma` and `n`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = Tensor::from_slice(&[self.n]);
        let tensors = vec![
            ("mu".to_string(), self.mu.shallow_clone()),
            ("sigma".to_string(), self.sigma.shallow_clone()),
            ("n".to_string(), n),
        ];
        crate::weights::save_safetensors(&tensors, path, None, None)
    }

    /// Load statistics saved by [`Self::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let map: std::collections::HashMap<String, Tensor> =
            crate::weights::read_safetensors(path)?
                .into_iter()
                .collect();
        let get = |k: &str| {
            map.get(k)
                .with_context(|| format!("{}: no tensor {k:?}", path.display()))
        };
        let mu = get("mu")?.to_kind(Kind::Double);
        let sigma = get("sigma")?.to_kind(Kind::Double);
        let n = get("n")?.int64_value(&[0]);
        let d = mu.size();
        if d.len() != 1 || sigma.size() != [d[0], d[0]] {
            bail!(
                "{}: mu {:?} and sigma {:?} are not [D] and [D, D]",
                path.display(),
                d,
                sigma.size()
            );
        }
        Ok(GaussianStats { mu, sigma, n })
    }
}

/// Streaming mean / covariance accumulator (float64, on the features' device).
#[derive(Debug, Default)]
pub struct FeatureAccumulator {
    shift: Option<Tensor>,
    sum: Option<Tensor>,
    outer: Option<Tensor>,
    n: i64,
}

impl FeatureAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of samples added so far.
    pub fn count(&self) -> i64 {
        self.n
    }

    /// Add a batch of features `[N, D]` (any float kind; D must match earlier batches).
    pub fn add(&mut self, features: &Tensor) -> Result<()> {
        let s = features.size();
        if s.len() != 2 {
            bail!("feature statistics: expected a feature matrix [N, D], found {s:?}");
        }
        if s[0] == 0 {
            return Ok(());
        }
        let x = features.detach().to_kind(Kind::Double);
        if let Some(shift) = &self.shift {
            if shift.size()[0] != s[1] {
                bail!(
                    "feature statistics: batch has {} features per sample, earlier batches had {}",
                    s[1],
                    shift.size()[0]
                );
            }
        } else {
            self.shift = Some(x.mean_dim([0i64].as_slice(), false, Kind::Double));
        }
        let xc = x - self
            .shift
            .as_ref()
            .expect("set above")
            .to_device(features.device());
        let sum = xc.sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
        let outer = xc.transpose(0, 1).matmul(&xc);
        self.sum = Some(match self.sum.take() {
            Some(t) => {
                let dev = t.device();
                t + sum.to_device(dev)
            }
            None => sum,
        });
        self.outer = Some(match self.outer.take() {
            Some(t) => {
                let dev = t.device();
                t + outer.to_device(dev)
            }
            None => outer,
        });
        self.n += s[0];
        Ok(())
    }

    /// Mean and unbiased covariance of everything added (needs at least 2 samples).
    pub fn stats(&self) -> Result<GaussianStats> {
        if self.n < 2 {
            bail!(
                "feature statistics: need at least 2 samples for a covariance, have {}",
                self.n
            );
        }
        let (shift, sum, outer) = match (&self.shift, &self.sum, &self.outer) {
            (Some(a), Some(b), Some(c)) => (
                a.to_device(Device::Cpu),
                b.to_device(Device::Cpu),
                c.to_device(Device::Cpu),
            ),
            _ => bail!("feature statistics: nothing accumulated"),
        };
        let n = self.n as f64;
        let mean_c = &sum / n;
        let mu = &shift + &mean_c;
        let sigma = (outer - mean_c.unsqueeze(1).matmul(&sum.unsqueeze(0))) / (n - 1.0);
        let sigma = (&sigma + sigma.transpose(0, 1)) * 0.5;
        Ok(GaussianStats {
            mu,
            sigma,
            n: self.n,
        })
    }
}

/// FD and its parts.
#[derive(Clone, Debug, PartialEq)]
pub struct FdParts {
    /// The distance.
    pub fd: f64,
    /// `|mu1 - mu2|^2`.
    pub mean_term: f64,
    /// `tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`.
    pub cov_term: f64,
    /// `tr sqrt(S1 S2)`.
    pub trace_sqrt: f64,
    /// Whether the `eps * I` guard was needed.
    pub offset_used: bool,
}

fn sym(a: &Tensor) -> Tensor {
    (a + a.transpose(0, 1)) * 0.5
}

/// Symmetric PSD square root by eigendecomposition (eigenvalues clamped at 0).
fn psd_sqrt(a: &Tensor) -> Result<Tensor> {
    let (w, v) = sym(a)
        .f_linalg_eigh("L")
        .context("eigendecomposition of a covariance")?;
    let w = w.clamp_min(0.0).sqrt();
    Ok((&v * w.unsqueeze(0)).matmul(&v.transpose(0, 1)))
}

/// `tr sqrt(S1 S2)` via `tr sqrt(S1^1/2 S2 S1^1/2)`.
fn trace_sqrt_product(s1: &Tensor, s2: &Tensor) -> Result<f64> {
    let r1 = psd_sqrt(s1)?;
    let m = sym(&r1.matmul(s2).matmul(&r1));
    let w = m
        .f_linalg_eigvalsh("L")
        .context("eigenvalues of S1^1/2 S2 S1^1/2")?;
    Ok(w.clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[]))
}

/// Frechet distance between two Gaussians, with its parts.
pub fn frechet_distance_parts(a: &GaussianStats, b: &GaussianStats) -> Result<FdParts> {
    let d = a.dim();
    if b.dim() != d || a.sigma.size() != [d, d] || b.sigma.size() != [d, d] {
        bail!(
            "Frechet distance: statistics of different dimension: mu {:?} / sigma {:?} vs mu {:?} / sigma {:?}",
            a.mu.size(),
            a.sigma.size(),
            b.mu.size(),
            b.sigma.size()
        );
    }
    let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let (mu1, mu2, s1, s2) = (cpu(&a.mu), cpu(&b.mu), cpu(&a.sigma), cpu(&b.sigma));
    let mean_term = (&mu1 - &mu2).square().sum(Kind::Double).double_value(&[]);
    let tr1 = s1.trace().double_value(&[]);
    let tr2 = s2.trace().double_value(&[]);
    if !(mean_term.is_finite() && tr1.is_finite() && tr2.is_finite()) {
        bail!("Frechet distance: statistics contain non-finite values");
    }
    let (trace_sqrt, offset_used) = match trace_sqrt_product(&s1, &s2) {
        Ok(t) if t.is_finite() => (t, false),
        first => {
            let eye = Tensor::eye(d, (Kind::Double, Device::Cpu)) * FD_EPS;
            let t = trace_sqrt_product(&(&s1 + &eye), &(&s2 + &eye)).with_context(|| {
                format!("Frechet distance: matrix square root failed even with {FD_EPS} * I added (first try: {first:?})")
            })?;
            if !t.is_finite() {
                bail!("Frechet distance: matrix square root is not finite even with {FD_EPS} * I added");
            }
            tracing::warn!("Frechet distance: near-singular covariance product; added {FD_EPS} * I to both covariances");
            (t, true)
        }
    };
    let cov_term = tr1 + tr2 - 2.0 * trace_sqrt;
    Ok(FdParts {
        fd: mean_term + cov_term,
        mean_term,
        cov_term,
        trace_sqrt,
        offset_used,
    })
}

/// Frechet distance between two Gaussians.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    Ok(frechet_distance_parts(a, b)?.fd)
}

/// Frechet distance between two feature matrices `[N, D]`, `[M, D]`.
pub fn frechet_distance_features(a: &Tensor, b: &Tensor) -> Result<f64> {
    frechet_distance(
        &GaussianStats::from_features(a)?,
        &GaussianStats::from_features(b)?,
    )
}

/// Polynomial kernel of KID: `k(x, y) = (x . y / D + 1)^3`, all pairs, `[N, M]`.
pub fn polynomial_kernel(x: &Tensor, y: &Tensor) -> Tensor {
    let d = x.size()[1] as f64;
    (x.matmul(&y.transpose(0, 1)) / d + 1.0).pow_tensor_scalar(3)
}

/// Unbiased estimate of the squared MMD with the polynomial kernel between samples
/// `x` `[m, D]` and `y` `[n, D]` (m, n >= 2): the within-set means exclude the
/// diagonal.
pub fn mmd2_unbiased(x: &Tensor, y: &Tensor) -> Result<f64> {
    let (sx, sy) = (x.size(), y.size());
    if sx.len() != 2 || sy.len() != 2 || sx[1] != sy[1] {
        bail!("KID: expected feature matrices [m, D] and [n, D], found {sx:?} and {sy:?}");
    }
    let (m, n) = (sx[0], sy[0]);
    if m < 2 || n < 2 {
        bail!("KID: need at least 2 samples per set, have {m} and {n}");
    }
    let x = x.detach().to_kind(Kind::Double);
    let y = y.detach().to_kind(Kind::Double).to_device(x.device());
    let kxx = polynomial_kernel(&x, &x);
    let kyy = polynomial_kernel(&y, &y);
    let kxy = polynomial_kernel(&x, &y);
    let off = |k: &Tensor| (k.sum(Kind::Double) - k.trace()).double_value(&[]);
    let (mf, nf) = (m as f64, n as f64);
    Ok(
        off(&kxx) / (mf * (mf - 1.0)) + off(&kyy) / (nf * (nf - 1.0))
            - 2.0 * kxy.sum(Kind::Double).double_value(&[]) / (mf * nf),
    )
}

/// KID estimate: mean and standard deviation over subsets.
#[derive(Clone, Debug, PartialEq)]
pub struct Kid {
    pub mean: f64,
    pub std: f64,
    pub subsets: usize,
    pub subset_size: i64,
}

/// Kernel inception distance: the unbiased polynomial-kernel MMD^2 averaged over
/// `subsets` random subsets of `subset_size` samples of each set (drawn without
/// replacement within a subset, from tch's global generator). `subset_size` is
/// capped at the smaller set size.
pub fn kid(x: &Tensor, y: &Tensor, subsets: usize, subset_size: i64) -> Result<Kid> {
    let (sx, sy) = (x.size(), y.size());
    if sx.len() != 2 || sy.len() != 2 || sx[1] != sy[1] {
        bail!("KID: expected feature matrices [m, D] and [n, D], found {sx:?} and {sy:?}");
    }
    if subsets == 0 {
        bail!("KID: subsets must be at least 1");
    }
    let size = subset_size.min(sx[0]).min(sy[0]);
    if size < 2 {
        bail!(
            "KID: subsets need at least 2 samples, sets have {} and {}, subset_size {subset_size}",
            sx[0],
            sy[0]
        );
    }
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let ix = Tensor::randperm(sx[0], (Kind::Int64, Device::Cpu))
            .narrow(0, 0, size)
            .to_device(x.device());
        let iy = Tensor::randperm(sy[0], (Kind::Int64, Device::Cpu))
            .narrow(0, 0, size)
            .to_device(y.device());
        values.push(mmd2_unbiased(
            &x.index_select(0, &ix),
            &y.index_select(0, &iy),
        )?);
    }
    let k = values.len() as f64;
    let mean = values.iter().sum::<f64>() / k;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / k).sqrt();
    Ok(Kid {
        mean,
        std,
        subsets,
        subset_size: size,
    })
}
