//! UNet2DConditionModel parity against the diffusers reference outputs, plus saving,
//! reloading and checkpoint validation.

mod common;

use adt::models::unet::{self, LoadedUNet, UNetConfig};
use common::fixtures;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// The tensors a call's kwargs name, keyed by keyword.
fn call_inputs(call: &serde_json::Value, io: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    call["kwargs"]
        .as_object()
        .expect("kwargs object")
        .iter()
        .map(|(k, v)| {
            let key = v["tensor"]
                .as_str()
                .unwrap_or_else(|| panic!("kwarg {k} is not a tensor"));
            (k.clone(), io[key].shallow_clone())
        })
        .collect()
}

fn forward_call(unet: &LoadedUNet, inputs: &HashMap<String, Tensor>) -> Tensor {
    let added = if unet.config.needs_added_cond() {
        Some((&inputs["text_embeds"], &inputs["time_ids"]))
    } else {
        None
    };
    tch::no_grad(|| {
        unet.model.forward(
            &inputs["sample"],
            &inputs["timestep"],
            &inputs["encoder_hidden_states"],
            added,
        )
    })
    .expect("forward")
}

fn check_fixture(name: &str) {
    let dir = fixtures::dir(name);
    let unet = LoadedUNet::load(&dir, Device::Cpu, Kind::Float).expect("load");
    let io = fixtures::io(name).expect("io");
    let case = fixtures::case(name).expect("case");
    let calls = case["calls"].as_array().expect("calls");
    assert!(!calls.is_empty());
    for call in calls {
        let cname = call["name"].as_str().unwrap();
        let inputs = call_inputs(call, &io);
        let out = forward_call(&unet, &inputs);
        for (oname, key) in call["outputs"].as_object().unwrap() {
            assert_eq!(oname, "sample");
            let reference = &io[key.as_str().unwrap()];
            let err = fixtures::max_rel_err(&out, reference);
            println!("{name}/{cname}/{oname}: max rel err {err:.3e}");
            assert!(
                err <= TOL,
                "{name}/{cname}/{oname}: max rel err {err:.3e} > {TOL:e}"
            );
        }
    }
}

#[test]
fn parity_unet_sd15() {
    check_fixture("unet_sd15");
}

#[test]
fn parity_unet_sdxl() {
    check_fixture("unet_sdxl");
}

#[test]
fn run_forward_matches_fixture_and_names_missing_inputs() {
    let name = "unet_sdxl";
    let io = fixtures::io(name).unwrap();
    let case = fixtures::case(name).unwrap();
    let call = &case["calls"][0];
    let mut inputs = call_inputs(call, &io);
    let out = unet::run_forward("unet", &fixtures::dir(name), &inputs).unwrap();
    let key = call["outputs"]["sample"].as_str().unwrap();
    let err = fixtures::max_rel_err(&out["sample"], &io[key]);
    println!("run_forward unet_sdxl: max rel err {err:.3e}");
    assert!(err <= TOL);

    inputs.remove("time_ids");
    let e = unet::run_forward("unet", &fixtures::dir(name), &inputs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing input time_ids"), "{e}");
    let e = unet::run_forward("unet2", &fixtures::dir(name), &inputs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unet2"), "{e}");
}

#[test]
fn scalar_and_per_sample_timesteps_agree() {
    let name = "unet_sd15";
    let unet = LoadedUNet::load(&fixtures::dir(name), Device::Cpu, Kind::Float).unwrap();
    let io = fixtures::io(name).unwrap();
    let sample = &io["scalar_t.in.sample"];
    let ehs = &io["scalar_t.in.encoder_hidden_states"];
    let t0 = &io["scalar_t.in.timestep"];
    assert_eq!(t0.dim(), 0);
    let tv = t0.int64_value(&[]);
    let f = |t: &Tensor| tch::no_grad(|| unet.model.forward(sample, t, ehs, None)).unwrap();
    let a = f(t0);
    let b = f(&Tensor::from_slice(&[tv, tv]));
    let c = f(&Tensor::from(tv as f32));
    let d = f(&Tensor::from_slice(&[tv as f64]));
    for (label, other) in [("int64 [B]", &b), ("float 0-d", &c), ("double [1]", &d)] {
        let diff = (&a - other).abs().max().double_value(&[]);
        println!("scalar vs {label}: max abs diff {diff:.3e}");
        assert!(diff <= 1e-6, "{label}: {diff}");
    }
    // A wrong batch of timesteps is an error, not a silent broadcast.
    let e = tch::no_grad(|| {
        unet.model
            .forward(sample, &Tensor::from_slice(&[1i64, 2, 3]), ehs, None)
    })
    .unwrap_err();
    assert!(e.to_string().contains("timestep"), "{e}");
    // SD1.5 takes no added conditioning, SDXL requires it.
    let e = tch::no_grad(|| unet.model.forward(sample, t0, ehs, Some((ehs, ehs)))).unwrap_err();
    assert!(e.to_string().contains("addition_embed_type"), "{e}");
    let xl = LoadedUNet::load(&fixtures::dir("unet_sdxl"), Device::Cpu, Kind::Float).unwrap();
    let io = fixtures::io("unet_sdxl").unwrap();
    let e = tch::no_grad(|| {
        xl.model.forward(
            &io["text_time.in.sample"],
            &io["text_time.in.timestep"],
            &io["text_time.in.encoder_hidden_states"],
            None,
        )
    })
    .unwrap_err();
    assert!(e.to_string().contains("text_embeds"), "{e}");
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn train_save_reload_roundtrip() {
    let name = "unet_sd15";
    let dir = fixtures::dir(name);
    let io = fixtures::io(name).unwrap();
    let unet = LoadedUNet::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let sample = &io["per_sample_t.in.sample"];
    let t = &io["per_sample_t.in.timestep"];
    let ehs = &io["per_sample_t.in.encoder_hidden_states"];
    let before = tch::no_grad(|| unet.model.forward(sample, t, ehs, None)).unwrap();

    let trainable = unet.vs.trainable_variables();
    assert_eq!(trainable.len(), unet.vs.variables().len());
    assert!(trainable.iter().all(|v| v.requires_grad()));
    let mut opt = nn::Sgd::default().build(&unet.vs, 1e-2).unwrap();
    tch::manual_seed(7);
    let target = sample.randn_like();
    for _ in 0..2 {
        let out = unet.model.forward(sample, t, ehs, None).unwrap();
        let loss = (out - &target).square().mean(Kind::Float);
        opt.backward_step(&loss);
    }
    let after = tch::no_grad(|| unet.model.forward(sample, t, ehs, None)).unwrap();
    let moved = max_abs_diff(&before, &after);
    println!("output change after 2 SGD steps: {moved:.3e}");
    assert!(moved > 1e-6, "SGD steps did not change the model");

    let tmp = tempfile::tempdir().unwrap();
    unet.save_pretrained(tmp.path(), Kind::Float).unwrap();
    let saved_cfg = adt::models::config::read_json(&tmp.path().join("config.json")).unwrap();
    let orig_cfg = adt::models::config::read_json(&dir.join("config.json")).unwrap();
    assert_eq!(saved_cfg, orig_cfg);
    let reloaded = LoadedUNet::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    let again = tch::no_grad(|| reloaded.model.forward(sample, t, ehs, None)).unwrap();
    let diff = max_abs_diff(&after, &again);
    println!("reloaded vs trained: max abs diff {diff:e}");
    assert_eq!(diff, 0.0);

    // Saving in half precision writes f16 tensors with the same names.
    let tmp16 = tempfile::tempdir().unwrap();
    unet.save_pretrained(tmp16.path(), Kind::Half).unwrap();
    let w16 = tmp16.path().join("diffusion_pytorch_model.safetensors");
    assert_eq!(adt::weights::file_float_kind(&w16).unwrap(), Kind::Half);
    let names16: Vec<String> = adt::weights::read_safetensors(&w16)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let orig: Vec<String> =
        adt::weights::read_safetensors(&dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    assert_eq!(names16, orig);
}

/// Copy a fixture's config and weights into a temp dir, editing them on the way.
fn broken_copy(
    name: &str,
    edit_cfg: impl Fn(&mut serde_json::Value),
    edit_weights: impl Fn(&mut Vec<(String, Tensor)>),
) -> tempfile::TempDir {
    let src = fixtures::dir(name);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = adt::models::config::read_json(&src.join("config.json")).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(
        tmp.path().join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let mut w =
        adt::weights::read_safetensors(&src.join("diffusion_pytorch_model.safetensors")).unwrap();
    edit_weights(&mut w);
    adt::weights::save_safetensors(
        &w,
        &tmp.path().join("diffusion_pytorch_model.safetensors"),
        None,
        None,
    )
    .unwrap();
    tmp
}

fn load_err(dir: &Path) -> String {
    match LoadedUNet::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_checkpoints_error_clearly() {
    let victim = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let d = broken_copy("unet_sd15", |_| {}, |w| w.retain(|(n, _)| n != victim));
    let e = load_err(d.path());
    println!("missing tensor: {e}");
    assert!(e.contains(victim) && e.contains("missing"), "{e}");

    let d = broken_copy(
        "unet_sd15",
        |_| {},
        |w| {
            for (n, t) in w.iter_mut() {
                if n == victim {
                    *t = Tensor::zeros([32, 31], (Kind::Float, Device::Cpu));
                }
            }
        },
    );
    let e = load_err(d.path());
    println!("wrong shape: {e}");
    assert!(
        e.contains(victim) && e.contains("[32, 31]") && e.contains("[32, 32]"),
        "{e}"
    );

    let d = broken_copy(
        "unet_sd15",
        |c| c["resnet_time_scale_shift"] = "scale_shift".into(),
        |_| {},
    );
    let e = load_err(d.path());
    println!("scale_shift: {e}");
    assert!(
        e.contains("resnet_time_scale_shift")
            && e.contains("scale_shift")
            && e.contains("config.json"),
        "{e}"
    );

    let d = broken_copy(
        "unet_sd15",
        |c| c["class_embed_type"] = "timestep".into(),
        |_| {},
    );
    let e = load_err(d.path());
    println!("class_embed_type: {e}");
    assert!(
        e.contains("class_embed_type") && e.contains("timestep"),
        "{e}"
    );

    let d = broken_copy(
        "unet_sd15",
        |c| c["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into(),
        |_| {},
    );
    let e = load_err(d.path());
    assert!(
        e.contains("down_block_types") && e.contains("SimpleCrossAttnDownBlock2D"),
        "{e}"
    );

    // An extra tensor the architecture does not have.
    let d = broken_copy(
        "unet_sd15",
        |_| {},
        |w| {
            w.push((
                "class_embedding.linear_1.weight".into(),
                Tensor::zeros([4, 4], (Kind::Float, Device::Cpu)),
            ))
        },
    );
    let e = load_err(d.path());
    assert!(
        e.contains("class_embedding.linear_1.weight") && e.contains("unexpected"),
        "{e}"
    );
}

#[test]
fn presets_and_tiny_configs() {
    let sd15 = UNetConfig::sd15();
    sd15.validate().unwrap();
    assert_eq!(sd15.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(sd15.in_channels, 4);
    assert_eq!(sd15.out_channels, 4);
    assert_eq!(sd15.sample_size, Some(64));
    assert_eq!(sd15.time_embed_dim(), 1280);
    assert!(!sd15.needs_added_cond());
    let sdxl = UNetConfig::sdxl();
    sdxl.validate().unwrap();
    assert!(sdxl.needs_added_cond());
    // The presets survive a JSON round trip through the diffusers field names.
    assert_eq!(UNetConfig::from_value(&sd15.to_value()).unwrap(), sd15);
    assert_eq!(UNetConfig::from_value(&sdxl.to_value()).unwrap(), sdxl);

    tch::manual_seed(3);
    for cfg in [UNetConfig::tiny_sd15(), UNetConfig::tiny_sdxl()] {
        let u = LoadedUNet::from_config(&cfg, Device::Cpu, Kind::Float).unwrap();
        // A size that is not a multiple of the down-sampling factor still round-trips.
        let x = Tensor::randn([2, 4, 9, 7], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10i64, 500]);
        let te = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
        let ti = Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.]).repeat([2, 1]);
        let added = cfg.needs_added_cond().then_some((&te, &ti));
        let y = u.model.forward(&x, &t, &ctx, added).unwrap();
        assert_eq!(y.size(), x.size());
        y.square().sum(Kind::Float).backward();
        let with_grad =
            u.vs.trainable_variables()
                .iter()
                .filter(|v| v.grad().defined())
                .count();
        assert_eq!(
            with_grad,
            u.vs.variables().len(),
            "every UNet variable gets a gradient"
        );
        // from_config writes a loadable checkpoint.
        let tmp = tempfile::tempdir().unwrap();
        u.save_pretrained(tmp.path(), Kind::Float).unwrap();
        let r = LoadedUNet::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
        let y2 = tch::no_grad(|| r.model.forward(&x, &t, &ctx, added)).unwrap();
        assert_eq!(max_abs_diff(&y.detach(), &y2), 0.0);
    }
}

#[test]
fn loads_and_runs_in_bfloat16() {
    let name = "unet_sdxl";
    let io = fixtures::io(name).unwrap();
    let u = LoadedUNet::load(&fixtures::dir(name), Device::Cpu, Kind::BFloat16).unwrap();
    assert!(u
        .vs
        .variables()
        .values()
        .all(|v| v.kind() == Kind::BFloat16));
    let x = io["text_time.in.sample"].to_kind(Kind::BFloat16);
    let out = tch::no_grad(|| {
        u.model.forward(
            &x,
            &io["text_time.in.timestep"],
            &io["text_time.in.encoder_hidden_states"],
            Some((
                &io["text_time.in.text_embeds"],
                &io["text_time.in.time_ids"],
            )),
        )
    })
    .unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    let err = fixtures::max_rel_err(&out, &io["text_time.out.sample"]);
    println!("bf16 unet_sdxl: max rel err {err:.3e}");
    assert!(err < 5e-2, "bf16 error {err}");
}
