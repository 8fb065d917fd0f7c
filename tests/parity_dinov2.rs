//! DINOv2 against transformers' `Dinov2Model` outputs (tests/fixtures/dinov2).

mod common;

use adt::disc::features::{DinoFeatures, Levels};
use adt::disc::FeatureNetwork;
use adt::models::dinov2::{run_forward, Dinov2Config, Dinov2Model};
use common::fixtures;
use std::collections::HashMap;
use tch::{nn, Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn call_inputs(call: &serde_json::Value, io: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut inputs = HashMap::new();
    for (arg, spec) in call["kwargs"].as_object().expect("kwargs object") {
        let key = spec["tensor"]
            .as_str()
            .unwrap_or_else(|| panic!("kwarg {arg} is not a tensor"));
        let t = io
            .get(key)
            .unwrap_or_else(|| panic!("io.safetensors has no {key}"));
        inputs.insert(arg.clone(), t.shallow_clone());
    }
    inputs
}

#[test]
fn dinov2_matches_transformers_on_every_call() {
    let case = fixtures::case("dinov2").unwrap();
    let io = fixtures::io("dinov2").unwrap();
    let dir = fixtures::dir("dinov2");
    let calls = case["calls"].as_array().unwrap();
    assert!(calls.len() >= 5, "expected at least 5 calls in case.json");
    let mut checked = 0;
    for call in calls {
        let name = call["name"].as_str().unwrap();
        let component = if name.starts_with("grad") {
            "dinov2-grad"
        } else {
            "dinov2"
        };
        let inputs = call_inputs(call, &io);
        let outputs = run_forward(component, &dir, &inputs).unwrap();
        for (out_name, key) in call["outputs"].as_object().unwrap() {
            let reference = &io[key.as_str().unwrap()];
            let ours = outputs
                .get(out_name)
                .unwrap_or_else(|| panic!("{name}: no output {out_name}"));
            let err = fixtures::max_rel_err(ours, reference);
            println!("{name:>9} {out_name:<18} max rel err {err:.3e}");
            assert!(
                err <= TOL,
                "{name}.{out_name}: max rel err {err:.3e} > {TOL:e}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * 7 + 2 * 2, "only {checked} outputs compared");
}

#[test]
fn missing_input_is_named() {
    let err = run_forward("dinov2", &fixtures::dir("dinov2"), &HashMap::new()).unwrap_err();
    assert!(format!("{err:#}").contains("pixel_values"), "{err:#}");
    let io = fixtures::io("dinov2").unwrap();
    let inputs = HashMap::from([(
        "pixel_values".to_string(),
        io["res56x56.in.pixel_values"].shallow_clone(),
    )]);
    let err = run_forward("dinov2-grad", &fixtures::dir("dinov2"), &inputs).unwrap_err();
    assert!(format!("{err:#}").contains("\"R\""), "{err:#}");
}

#[test]
fn loaded_weights_are_frozen_and_half_precision_loads() {
    let loaded = Dinov2Model::load(&fixtures::dir("dinov2"), Device::Cpu, Kind::Float).unwrap();
    for (name, t) in loaded.vs.variables() {
        assert!(!t.requires_grad(), "{name} is not frozen");
    }
    assert_eq!(loaded.config, Dinov2Config::tiny());
    let half = Dinov2Model::load(&fixtures::dir("dinov2"), Device::Cpu, Kind::BFloat16).unwrap();
    let io = fixtures::io("dinov2").unwrap();
    let out = tch::no_grad(|| half.model.forward(&io["res70x70.in.pixel_values"])).unwrap();
    let err = fixtures::max_rel_err(
        &out.last_hidden_state,
        &io["res70x70.out.last_hidden_state"],
    );
    println!("bfloat16 res70x70 last_hidden_state max rel err {err:.3e}");
    assert!(err < 0.1, "bfloat16 forward is far off: {err}");
}

#[test]
fn unsupported_configs_are_rejected() {
    let mut c = Dinov2Config::tiny();
    c.hidden_act = "quick_gelu".into();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("hidden_act") && e.contains("quick_gelu"), "{e}");
    let mut c = Dinov2Config::tiny();
    c.num_register_tokens = Some(4);
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("num_register_tokens"), "{e}");
    let mut c = Dinov2Config::tiny();
    c.hidden_size = 33;
    assert!(c.validate().is_err());
}

#[test]
fn swiglu_variant_builds_with_transformers_names() {
    let mut c = Dinov2Config::tiny();
    c.use_swiglu_ffn = true;
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Dinov2Model::new(&vs.root(), &c).unwrap();
    let vars = vs.variables();
    // hidden 32 * 4 = 128 -> 2/3 -> 85 -> rounded up to 88.
    assert_eq!(
        vars["encoder.layer.0.mlp.weights_in.weight"].size(),
        vec![176, 32]
    );
    assert_eq!(
        vars["encoder.layer.0.mlp.weights_out.weight"].size(),
        vec![32, 88]
    );
    let out = m
        .forward(&Tensor::randn([1, 3, 56, 56], (Kind::Float, Device::Cpu)))
        .unwrap();
    assert_eq!(out.last_hidden_state.size(), vec![1, 17, 32]);
}

#[test]
fn vit_s14_preset_has_dinov2_small_shapes() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = Dinov2Model::new(&vs.root(), &Dinov2Config::vit_s14()).unwrap();
    let vars = vs.variables();
    assert_eq!(
        vars["embeddings.position_embeddings"].size(),
        vec![1, 37 * 37 + 1, 384]
    );
    assert_eq!(
        vars["encoder.layer.11.mlp.fc1.weight"].size(),
        vec![1536, 384]
    );
    assert!(!vars.contains_key("encoder.layer.12.norm1.weight"));
    let n: i64 = vars.values().map(|t| t.numel() as i64).sum();
    // facebook/dinov2-small has 22.06 M parameters including its 384-d mask token.
    assert_eq!(n + 384, 22_056_576);
}

#[test]
fn feature_network_returns_patch_tokens_of_the_tapped_layers() {
    let loaded = Dinov2Model::load(&fixtures::dir("dinov2"), Device::Cpu, Kind::Float).unwrap();
    let f = DinoFeatures::new(
        loaded.model,
        Some(loaded.vs),
        56,
        &[0, 2, 3],
        Levels::Blocks,
    )
    .unwrap();
    assert_eq!(f.channels(), vec![32, 32, 32]);
    // Images at the network's resolution: no resize, so the taps are the fixture's
    // hidden states (after ImageNet normalisation of the [-1, 1] input).
    let io = fixtures::io("dinov2").unwrap();
    let px = io["res56x56.in.pixel_values"].shallow_clone();
    let mean = Tensor::from_slice(&[0.485f32, 0.456, 0.406]).view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&[0.229f32, 0.224, 0.225]).view([1, 3, 1, 1]);
    let images = ((&px * &std + &mean) * 2.0 - 1.0).set_requires_grad(true);
    let feats = f.features(&images);
    assert_eq!(feats.len(), 3);
    for (feat, layer) in feats.iter().zip([0usize, 2, 3]) {
        assert_eq!(feat.size(), vec![2, 32, 16]);
        let reference = io[&format!("res56x56.out.hidden_states_{}", layer + 1)]
            .narrow(1, 1, 16)
            .transpose(1, 2);
        let err = fixtures::max_rel_err(feat, &reference);
        println!("features block {layer}: max rel err {err:.3e}");
        assert!(err <= TOL, "block {layer}: {err:.3e}");
    }
    // Differentiable with respect to the images, through a resize.
    let big = Tensor::randn([1, 3, 80, 80], (Kind::Float, Device::Cpu))
        .tanh()
        .set_requires_grad(true);
    let feats = f.features(&big);
    let loss = feats
        .iter()
        .map(|t| t.square().sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    let g = Tensor::run_backward(&[&loss], &[&big], false, false);
    assert_eq!(g[0].size(), vec![1, 3, 80, 80]);
    assert!(g[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn feature_network_rejects_bad_options() {
    let vs = nn::VarStore::new(Device::Cpu);
    let m = Dinov2Model::new(&vs.root(), &Dinov2Config::tiny()).unwrap();
    assert!(DinoFeatures::new(m, None, 50, &[0], Levels::Blocks).is_err());
    let m = Dinov2Model::new(&(&vs.root() / "b"), &Dinov2Config::tiny()).unwrap();
    let e = DinoFeatures::new(m, None, 56, &[4], Levels::Blocks)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("block 4"), "{e}");
}
