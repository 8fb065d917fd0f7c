//! Frechet distance and KID.

use adt::eval::fd::{
    frechet_distance, frechet_distance_features, frechet_distance_parts, kid, mmd2_unbiased,
    FeatureAccumulator, GaussianStats,
};
use tch::{Device, Kind, Tensor};

const CPU: (Kind, Device) = (Kind::Double, Device::Cpu);

fn stats(mu: &[f64], sigma: &[f64]) -> GaussianStats {
    let d = mu.len() as i64;
    GaussianStats {
        mu: Tensor::from_slice(mu),
        sigma: Tensor::from_slice(sigma).view([d, d]),
        n: 100,
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn random_orthogonal(d: i64) -> Tensor {
    let (q, _) = Tensor::linalg_qr(&Tensor::randn([d, d], CPU), "reduced");
    q
}

#[test]
fn one_dimensional_gaussians() {
    for (m1, s1, m2, s2) in [
        (0.0, 1.0, 0.0, 1.0),
        (1.5, 2.0, -0.5, 0.5),
        (3.0, 0.1, 3.0, 4.0),
    ] {
        let fd = frechet_distance(&stats(&[m1], &[s1 * s1]), &stats(&[m2], &[s2 * s2])).unwrap();
        let expected: f64 = (m1 - m2) * (m1 - m2) + (s1 - s2) * (s1 - s2);
        println!("1-D: fd {fd} expected {expected}");
        assert!(close(fd, expected, 1e-12));
    }
}

#[test]
fn commuting_covariances() {
    tch::manual_seed(1);
    let d = 6;
    let a: Vec<f64> = (0..d).map(|i| 0.5 + i as f64).collect();
    let b: Vec<f64> = (0..d).map(|i| 3.0 / (1.0 + i as f64)).collect();
    let mu1: Vec<f64> = (0..d).map(|i| i as f64 * 0.3).collect();
    let mu2: Vec<f64> = (0..d).map(|i| 1.0 - i as f64 * 0.1).collect();
    let expected: f64 = mu1
        .iter()
        .zip(&mu2)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        + a.iter()
            .zip(&b)
            .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
            .sum::<f64>();
    // Diagonal.
    let diag = |v: &[f64]| Tensor::from_slice(v).diag(0);
    let s1 = GaussianStats {
        mu: Tensor::from_slice(&mu1),
        sigma: diag(&a),
        n: 10,
    };
    let s2 = GaussianStats {
        mu: Tensor::from_slice(&mu2),
        sigma: diag(&b),
        n: 10,
    };
    let fd = frechet_distance(&s1, &s2).unwrap();
    println!("diagonal: fd {fd} expected {expected}");
    assert!(close(fd, expected, 1e-10));
    // Same eigenvectors, rotated: S = Q diag Q^T.
    let q = random_orthogonal(d as i64);
    let rot = |v: &[f64]| q.matmul(&diag(v)).matmul(&q.transpose(0, 1));
    let r1 = GaussianStats {
        mu: Tensor::from_slice(&mu1),
        sigma: rot(&a),
        n: 10,
    };
    let r2 = GaussianStats {
        mu: Tensor::from_slice(&mu2),
        sigma: rot(&b),
        n: 10,
    };
    let fd = frechet_distance(&r1, &r2).unwrap();
    println!("rotated: fd {fd} expected {expected}");
    assert!(close(fd, expected, 1e-10));
}

/// For 2x2 matrices whose product has non-negative eigenvalues,
/// `tr sqrt(A) = sqrt(tr A + 2 sqrt(det A))`.
#[test]
fn non_commuting_two_by_two() {
    let s1: [f64; 4] = [2.0, 0.7, 0.7, 1.0];
    let s2: [f64; 4] = [0.5, -0.3, -0.3, 3.0];
    let p = [
        s1[0] * s2[0] + s1[1] * s2[2],
        s1[0] * s2[1] + s1[1] * s2[3],
        s1[2] * s2[0] + s1[3] * s2[2],
        s1[2] * s2[1] + s1[3] * s2[3],
    ];
    let tr_sqrt = (p[0] + p[3] + 2.0 * (p[0] * p[3] - p[1] * p[2]).sqrt()).sqrt();
    let mu1 = [0.3, -1.0];
    let mu2 = [1.0, 0.5];
    let expected =
        (0.7f64).powi(2) + 1.5f64.powi(2) + (s1[0] + s1[3]) + (s2[0] + s2[3]) - 2.0 * tr_sqrt;
    let parts = frechet_distance_parts(&stats(&mu1, &s1), &stats(&mu2, &s2)).unwrap();
    println!("2x2: {parts:?}, expected fd {expected}, tr sqrt {tr_sqrt}");
    assert!(close(parts.trace_sqrt, tr_sqrt, 1e-12));
    assert!(close(parts.fd, expected, 1e-12));
    assert!(!parts.offset_used);
}

#[test]
fn symmetric_and_zero_on_itself() {
    tch::manual_seed(2);
    let d = 16;
    let x = Tensor::randn([200, d], CPU).matmul(&Tensor::randn([d, d], CPU));
    let y = Tensor::randn([150, d], CPU).matmul(&Tensor::randn([d, d], CPU)) + 0.5;
    let (a, b) = (
        GaussianStats::from_features(&x).unwrap(),
        GaussianStats::from_features(&y).unwrap(),
    );
    let ab = frechet_distance(&a, &b).unwrap();
    let ba = frechet_distance(&b, &a).unwrap();
    let aa = frechet_distance(&a, &a).unwrap();
    let scale = a.sigma.trace().double_value(&[]);
    println!("fd(a, b) {ab}, fd(b, a) {ba}, fd(a, a) {aa} (trace {scale})");
    assert!(ab > 0.0 && close(ab, ba, 1e-9));
    assert!(aa.abs() < 1e-9 * scale);
    // Rank-deficient covariances (fewer samples than dimensions) still give a finite
    // value, and zero on themselves.
    let few = Tensor::randn([5, d], CPU);
    let s = GaussianStats::from_features(&few).unwrap();
    let self_fd = frechet_distance(&s, &s).unwrap();
    let other = frechet_distance(&s, &a).unwrap();
    println!("rank-deficient: fd(s, s) {self_fd}, fd(s, a) {other}");
    // Zero eigenvalues carry rounding noise of order eps * |S|, whose square roots
    // (about sqrt(eps) * |S|^1/2 each) bound the attainable accuracy here.
    let s_scale = s.sigma.trace().double_value(&[]);
    assert!(self_fd.abs() < 1e-6 * s_scale && other.is_finite() && other > 0.0);
    // Dimension mismatch.
    let small = GaussianStats::from_features(&x.narrow(1, 0, 4)).unwrap();
    let err = frechet_distance(&a, &small).unwrap_err().to_string();
    assert!(err.contains("dimension"), "{err}");
}

#[test]
fn sample_statistics_by_hand() {
    let pts_a = [[1.0, 2.0], [2.0, 0.5], [4.0, 1.0], [0.0, -1.0], [3.0, 3.0]];
    let pts_b = [[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [2.0, -2.0]];
    let hand_stats = |pts: &[[f64; 2]]| {
        let n = pts.len() as f64;
        let m = [
            pts.iter().map(|p| p[0]).sum::<f64>() / n,
            pts.iter().map(|p| p[1]).sum::<f64>() / n,
        ];
        let mut c = [0.0; 4];
        for p in pts {
            let d = [p[0] - m[0], p[1] - m[1]];
            c[0] += d[0] * d[0];
            c[1] += d[0] * d[1];
            c[2] += d[1] * d[0];
            c[3] += d[1] * d[1];
        }
        (m, c.map(|v| v / (n - 1.0)))
    };
    let (ma, ca) = hand_stats(&pts_a);
    let (mb, cb) = hand_stats(&pts_b);
    let p = [
        ca[0] * cb[0] + ca[1] * cb[2],
        ca[0] * cb[1] + ca[1] * cb[3],
        ca[2] * cb[0] + ca[3] * cb[2],
        ca[2] * cb[1] + ca[3] * cb[3],
    ];
    let tr_sqrt = (p[0] + p[3] + 2.0 * (p[0] * p[3] - p[1] * p[2]).sqrt()).sqrt();
    let expected =
        (ma[0] - mb[0]).powi(2) + (ma[1] - mb[1]).powi(2) + ca[0] + ca[3] + cb[0] + cb[3]
            - 2.0 * tr_sqrt;
    let to_t = |pts: &[[f64; 2]]| {
        Tensor::from_slice(&pts.concat())
            .view([-1, 2])
            .to_kind(Kind::Float)
    };
    let fd = frechet_distance_features(&to_t(&pts_a), &to_t(&pts_b)).unwrap();
    println!("samples: fd {fd}, hand {expected}");
    assert!(close(fd, expected, 1e-10));
    let sa = GaussianStats::from_features(&to_t(&pts_a)).unwrap();
    for (i, v) in ca.iter().enumerate() {
        assert!(close(
            sa.sigma.view([-1]).double_value(&[i as i64]),
            *v,
            1e-12
        ));
    }
}

#[test]
fn streaming_accumulator_matches_whole_set() {
    tch::manual_seed(3);
    // A large common offset: the shifted sums keep full precision.
    let x = Tensor::randn([1000, 8], CPU) * 0.01 + 1e4;
    let whole = GaussianStats::from_features(&x).unwrap();
    let mut acc = FeatureAccumulator::new();
    for chunk in x.split(97, 0) {
        acc.add(&chunk).unwrap();
    }
    assert_eq!(acc.count(), 1000);
    let streamed = acc.stats().unwrap();
    let centred = &x - x.mean_dim([0i64].as_slice(), true, Kind::Double);
    let reference = centred.transpose(0, 1).matmul(&centred) / 999.0;
    let err_mu = (&streamed.mu - &whole.mu).abs().max().double_value(&[]);
    let err_cov = (&streamed.sigma - &reference).abs().max().double_value(&[]);
    let cov_scale = reference.abs().max().double_value(&[]);
    println!(
        "streamed vs whole: mean error {err_mu:e}, covariance relative error {:e}",
        err_cov / cov_scale
    );
    assert!(err_mu < 1e-9 && err_cov / cov_scale < 1e-9);
    // Errors: wrong width, too few samples, not a matrix.
    assert!(acc.add(&Tensor::zeros([3, 5], CPU)).is_err());
    let mut one = FeatureAccumulator::new();
    one.add(&Tensor::zeros([1, 5], CPU)).unwrap();
    assert!(one.stats().is_err());
    assert!(one.add(&Tensor::zeros([5], CPU)).is_err());
}

#[test]
fn stats_save_and_load() {
    tch::manual_seed(4);
    let s = GaussianStats::from_features(&Tensor::randn([50, 5], CPU)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.safetensors");
    s.save(&path).unwrap();
    let t = GaussianStats::load(&path).unwrap();
    assert_eq!(t.n, 50);
    assert!(frechet_distance(&s, &t).unwrap().abs() < 1e-12);
    assert_eq!(
        Vec::<f64>::try_from(&t.sigma.view([-1])).unwrap(),
        Vec::<f64>::try_from(&s.sigma.view([-1])).unwrap()
    );
}

fn hand_mmd(x: &[[f64; 2]], y: &[[f64; 2]]) -> f64 {
    let k = |a: &[f64; 2], b: &[f64; 2]| ((a[0] * b[0] + a[1] * b[1]) / 2.0 + 1.0).powi(3);
    let (m, n) = (x.len() as f64, y.len() as f64);
    let mut kxx = 0.0;
    for (i, a) in x.iter().enumerate() {
        for (j, b) in x.iter().enumerate() {
            if i != j {
                kxx += k(a, b);
            }
        }
    }
    let mut kyy = 0.0;
    for (i, a) in y.iter().enumerate() {
        for (j, b) in y.iter().enumerate() {
            if i != j {
                kyy += k(a, b);
            }
        }
    }
    let kxy: f64 = x.iter().flat_map(|a| y.iter().map(move |b| k(a, b))).sum();
    kxx / (m * (m - 1.0)) + kyy / (n * (n - 1.0)) - 2.0 * kxy / (m * n)
}

#[test]
fn kid_by_hand_and_on_samples() {
    let x = [[0.1, 0.5], [1.0, -0.2], [0.3, 0.3], [-0.7, 0.9]];
    let y = [[1.5, 1.0], [0.8, 1.2], [2.0, 0.1], [1.1, 1.9], [0.0, 1.0]];
    let to_t = |pts: &[[f64; 2]]| Tensor::from_slice(&pts.concat()).view([-1, 2]);
    let hand = hand_mmd(&x, &y);
    let ours = mmd2_unbiased(&to_t(&x), &to_t(&y)).unwrap();
    println!("MMD^2: ours {ours}, hand {hand}");
    assert!(close(ours, hand, 1e-12));
    // Subsets of the whole (smaller) set: the same value every time.
    let k = kid(&to_t(&x), &to_t(&y[..4]), 5, 10).unwrap();
    let hand4 = hand_mmd(&x, &y[..4]);
    assert_eq!(k.subset_size, 4);
    assert!(
        close(k.mean, hand4, 1e-12) && k.std < 1e-12,
        "{k:?} vs {hand4}"
    );

    tch::manual_seed(5);
    let a = Tensor::randn([400, 16], CPU);
    let b = Tensor::randn([400, 16], CPU);
    let c = Tensor::randn([400, 16], CPU) * 1.3 + 0.3;
    let same = kid(&a, &b, 50, 200).unwrap();
    let diff = kid(&a, &c, 50, 200).unwrap();
    println!("KID same distribution {same:?}, different {diff:?}");
    assert!(same.mean.abs() < 3.0 * same.std + 1e-3);
    assert!(diff.mean > 10.0 * same.mean.abs() && diff.mean > 5.0 * diff.std);
    assert!(kid(&a, &b.narrow(1, 0, 8), 5, 10).is_err());
}
