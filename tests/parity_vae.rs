//! AutoencoderKL parity against the diffusers reference outputs, latent scaling,
//! gradients of the frozen decoder, and config validation.

mod common;

use adt::models::vae::{self, AutoencoderKL, LoadedVae};
use common::fixtures;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn load(name: &str, kind: Kind) -> LoadedVae {
    LoadedVae::load(&fixtures::dir(name), Device::Cpu, kind).expect("load")
}

fn check_fixture(name: &str) {
    let v = load(name, Kind::Float);
    let io = fixtures::io(name).unwrap();
    let case = fixtures::case(name).unwrap();
    let calls = case["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    for call in calls {
        let cname = call["name"].as_str().unwrap();
        let outs: HashMap<String, Tensor> = tch::no_grad(|| match cname {
            "encode" => {
                let x = &io[call["kwargs"]["x"]["tensor"].as_str().unwrap()];
                let (mean, logvar) = v.model.encode(x).unwrap();
                HashMap::from([("mean".to_string(), mean), ("logvar".to_string(), logvar)])
            }
            "decode" => {
                let z = &io[call["kwargs"]["z"]["tensor"].as_str().unwrap()];
                HashMap::from([("sample".to_string(), v.model.decode(z).unwrap())])
            }
            other => panic!("unexpected call {other}"),
        });
        let expected = call["outputs"].as_object().unwrap();
        assert_eq!(expected.len(), outs.len());
        for (oname, key) in expected {
            let err = fixtures::max_rel_err(&outs[oname], &io[key.as_str().unwrap()]);
            println!("{name}/{cname}/{oname}: max rel err {err:.3e}");
            assert!(
                err <= TOL,
                "{name}/{cname}/{oname}: max rel err {err:.3e} > {TOL:e}"
            );
        }
    }
}

#[test]
fn parity_vae_sd() {
    check_fixture("vae");
}

#[test]
fn parity_vae_sd3() {
    check_fixture("vae_sd3");
}

#[test]
fn run_forward_components() {
    let name = "vae_sd3";
    let io = fixtures::io(name).unwrap();
    let dir = fixtures::dir(name);
    let enc = vae::run_forward(
        "vae-encode",
        &dir,
        &HashMap::from([("x".to_string(), io["encode.in.x"].shallow_clone())]),
    )
    .unwrap();
    for o in ["mean", "logvar"] {
        let err = fixtures::max_rel_err(&enc[o], &io[&format!("encode.out.{o}")]);
        println!("run_forward vae-encode {o}: {err:.3e}");
        assert!(err <= TOL);
    }
    let dec = vae::run_forward(
        "vae-decode",
        &dir,
        &HashMap::from([("z".to_string(), io["decode.in.z"].shallow_clone())]),
    )
    .unwrap();
    let err = fixtures::max_rel_err(&dec["sample"], &io["decode.out.sample"]);
    println!("run_forward vae-decode sample: {err:.3e}");
    assert!(err <= TOL);
    let e = vae::run_forward("vae-decode", &dir, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing input z"), "{e}");
    let e = vae::run_forward("vae", &dir, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"vae\""), "{e}");
}

#[test]
fn latent_scaling_functions() {
    for (name, scale, shift) in [("vae", 0.18215, 0.0), ("vae_sd3", 1.5305, 0.0609)] {
        let v = load(name, Kind::Float);
        let io = fixtures::io(name).unwrap();
        assert_eq!(v.model.downscale(), 8);
        tch::no_grad(|| {
            let lat = v
                .model
                .latents_from_image(&io["encode.in.x"], false)
                .unwrap();
            let expect = (&io["encode.out.mean"] - shift) * scale;
            let err = fixtures::max_rel_err(&lat, &expect);
            println!("{name} latents_from_image: {err:.3e}");
            assert!(err <= TOL);
            let z = &io["decode.in.z"];
            let latents = (z - shift) * scale;
            let img = v.model.image_from_latents(&latents).unwrap();
            let err = fixtures::max_rel_err(&img, &io["decode.out.sample"]);
            println!("{name} image_from_latents: {err:.3e}");
            assert!(err <= TOL);
            let back = v.model.unscale_latents(&v.model.scale_latents(z));
            assert!((back - z).abs().max().double_value(&[]) < 1e-6);
        });
    }
}

#[test]
fn posterior_sample_uses_mean_and_std() {
    tch::manual_seed(11);
    let mean = Tensor::randn([4, 4, 16, 16], (Kind::Float, Device::Cpu));
    let logvar = Tensor::full([4, 4, 16, 16], 2.0f64.ln(), (Kind::Float, Device::Cpu));
    let s = AutoencoderKL::sample(&mean, &logvar);
    let noise = (&s - &mean) / 2f64.sqrt();
    let m = noise.mean(Kind::Double).double_value(&[]);
    let sd = noise.std(true).double_value(&[]);
    println!("standardised sample noise: mean {m:.3}, std {sd:.3}");
    assert!(
        m.abs() < 0.1 && (sd - 1.0).abs() < 0.1,
        "mean {m}, std {sd}"
    );
    let tight = AutoencoderKL::sample(
        &mean,
        &Tensor::full([4, 4, 16, 16], -30.0, (Kind::Float, Device::Cpu)),
    );
    assert!((tight - &mean).abs().max().double_value(&[]) < 1e-5);
}

#[test]
fn decode_gradient_matches_finite_differences() {
    for name in ["vae", "vae_sd3"] {
        let v = load(name, Kind::Double);
        assert!(
            v.vs.variables().values().all(|w| !w.requires_grad()),
            "VAE weights must be frozen"
        );
        let io = fixtures::io(name).unwrap();
        let z0 = io["decode.in.z"].to_kind(Kind::Double).narrow(0, 0, 1);
        tch::manual_seed(5);
        let out_shape = [1, 3, 32, 32];
        let r = Tensor::randn(out_shape, (Kind::Double, Device::Cpu));
        let f = |z: &Tensor| (v.model.decode(z).unwrap() * &r).sum(Kind::Double);

        let z = z0.detach().set_requires_grad(true);
        f(&z).backward();
        let grad = z.grad();
        assert!(grad.defined());
        let gmax = grad.abs().max().double_value(&[]);
        assert!(gmax > 0.0);
        let c = z0.size()[1];
        let coords = [
            [0, 0, 0, 0],
            [0, c - 1, 3, 3],
            [0, 1, 2, 1],
            [0, c / 2, 1, 2],
            [0, 2, 3, 0],
        ];
        let h = 1e-5;
        for idx in coords {
            let fd = tch::no_grad(|| {
                let bump = |d: f64| {
                    let zz = z0.copy();
                    let _ = zz
                        .get(idx[0])
                        .get(idx[1])
                        .get(idx[2])
                        .get(idx[3])
                        .fill_(z0.double_value(&idx) + d);
                    f(&zz).double_value(&[])
                };
                (bump(h) - bump(-h)) / (2.0 * h)
            });
            let an = grad.double_value(&idx);
            let rel = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-12);
            println!(
                "{name} dL/dz{idx:?}: autograd {an:.8e}, central diff {fd:.8e}, rel err {rel:.2e}"
            );
            assert!(rel < 1e-4, "{name} {idx:?}: rel err {rel:e}");
        }
    }
}

#[test]
fn bad_configs_error_clearly() {
    let src = fixtures::dir("vae");
    let write = |edit: &dyn Fn(&mut serde_json::Value)| {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = adt::models::config::read_json(&src.join("config.json")).unwrap();
        edit(&mut cfg);
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("diffusion_pytorch_model.safetensors"),
            tmp.path().join("diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        tmp
    };
    let err = |dir: &std::path::Path| match LoadedVae::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("load should fail"),
        Err(e) => format!("{e:#}"),
    };
    let d = write(&|c| c["latents_mean"] = serde_json::json!([0.1, 0.2, 0.3, 0.4]));
    let e = err(d.path());
    println!("{e}");
    assert!(
        e.contains("latents_mean") && e.contains("config.json"),
        "{e}"
    );
    let d = write(&|c| c["up_block_types"][1] = "AttnUpDecoderBlock2D".into());
    let e = err(d.path());
    assert!(
        e.contains("up_block_types") && e.contains("AttnUpDecoderBlock2D"),
        "{e}"
    );
    // The SD3 layout (no quant convs) against SD weights that have them.
    let d = write(&|c| c["use_quant_conv"] = false.into());
    let e = err(d.path());
    println!("{e}");
    assert!(
        e.contains("quant_conv.weight") && e.contains("unexpected"),
        "{e}"
    );
    // A latent width that does not match the weights.
    let d = write(&|c| c["latent_channels"] = 16.into());
    let e = err(d.path());
    println!("{e}");
    assert!(e.contains("shape"), "{e}");
}
