//! Parity of the CLIP text encoders against the transformers reference outputs.

mod common;

use adt::models::clip::{run_forward, ClipTextConfig, ClipTextModel};
use common::fixtures;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn::VarStore, Device, Kind, Tensor};

const TOL: f64 = 1e-4;

/// Inputs of a call, by keyword, from its `kwargs`.
fn call_inputs(call: &serde_json::Value, io: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut inputs = HashMap::new();
    for (arg, spec) in call["kwargs"].as_object().expect("kwargs object") {
        let key = spec["tensor"].as_str().expect("tensor kwarg");
        inputs.insert(arg.clone(), io[key].shallow_clone());
    }
    inputs
}

/// Run every call of a fixture through `run_forward` on `model_dir` and check every
/// output; returns the worst error.
fn check_fixture(name: &str, component: &str, model_dir: &Path) -> f64 {
    let case = fixtures::case(name).unwrap();
    let io = fixtures::io(name).unwrap();
    let mut worst: f64 = 0.0;
    for call in case["calls"].as_array().unwrap() {
        let inputs = call_inputs(call, &io);
        let outs = run_forward(component, model_dir, &inputs).unwrap();
        let expected = call["outputs"].as_object().unwrap();
        assert_eq!(
            outs.len(),
            expected.len(),
            "{name}: outputs {:?}",
            outs.keys().collect::<Vec<_>>()
        );
        for (out_name, key) in expected {
            let ours = outs
                .get(out_name)
                .unwrap_or_else(|| panic!("{name}: no output {out_name}"));
            let err = fixtures::max_rel_err(ours, &io[key.as_str().unwrap()]);
            println!(
                "{name} {} {out_name}: max rel err {err:.3e}",
                call["name"].as_str().unwrap()
            );
            assert!(err <= TOL, "{name} {out_name}: {err:.3e} > {TOL:.0e}");
            worst = worst.max(err);
        }
    }
    worst
}

#[test]
fn clip_text_matches_transformers() {
    check_fixture("clip_text", "clip-text", &fixtures::dir("clip_text"));
}

#[test]
fn clip_text_proj_matches_transformers() {
    check_fixture(
        "clip_text_proj",
        "clip-text-proj",
        &fixtures::dir("clip_text_proj"),
    );
}

/// A checkpoint saved without the `text_model.` prefix (as transformers 5 writes a
/// fresh CLIPTextModel) loads to the same outputs.
#[test]
fn loads_weights_without_text_model_prefix() {
    for (name, component) in [
        ("clip_text", "clip-text"),
        ("clip_text_proj", "clip-text-proj"),
    ] {
        let src = fixtures::dir(name);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let tensors: Vec<(String, Tensor)> =
            adt::weights::read_safetensors(&src.join("model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(n, t)| {
                    (
                        n.strip_prefix("text_model.").map(String::from).unwrap_or(n),
                        t,
                    )
                })
                .collect();
        assert!(tensors.iter().all(|(n, _)| !n.starts_with("text_model.")));
        adt::weights::save_safetensors(&tensors, &tmp.path().join("model.safetensors"), None, None)
            .unwrap();
        let worst = check_fixture(name, component, tmp.path());
        println!("{name} without prefix: worst {worst:.3e}");
    }
}

#[test]
fn missing_input_and_unknown_component_are_errors() {
    let dir = fixtures::dir("clip_text");
    let err = run_forward("clip-text", &dir, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_ids"), "{err}");
    let err = run_forward("clip-vision", &dir, &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("clip-vision"), "{err}");
    // clip-text-proj on a checkpoint without a projection
    let io = fixtures::io("clip_text").unwrap();
    let inputs = HashMap::from([(
        "input_ids".to_string(),
        io["prompts.in.input_ids"].shallow_clone(),
    )]);
    let err = run_forward("clip-text-proj", &dir, &inputs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_projection"), "{err}");
}

#[test]
fn unsupported_activation_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures::dir("clip_text");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_act"] = "relu".into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        ClipTextModel::load(tmp.path(), Device::Cpu, Kind::Float)
            .err()
            .unwrap()
    );
    assert!(err.contains("hidden_act") && err.contains("relu"), "{err}");
}

/// An all-ones attention mask gives the causal-only result; a padding mask leaves
/// the positions before the padding unchanged (the mask is causal as well) and
/// changes the ones after it.
#[test]
fn attention_mask_semantics() {
    let loaded =
        ClipTextModel::load(&fixtures::dir("clip_text"), Device::Cpu, Kind::Float).unwrap();
    let io = fixtures::io("clip_text").unwrap();
    let ids = io["prompts.in.input_ids"].shallow_clone();
    let plain = loaded.model.forward(&ids, None).unwrap();
    let ones = Tensor::ones(ids.size(), (Kind::Int64, Device::Cpu));
    let masked = loaded.model.forward(&ids, Some(&ones)).unwrap();
    let err = fixtures::max_rel_err(&masked.last_hidden_state, &plain.last_hidden_state);
    println!("all-ones mask vs no mask: {err:.3e}");
    assert!(err <= 1e-6);

    // Mask out key positions 10.. (row 0 has 10 real tokens); positions < 10 must not change.
    let mask = Tensor::arange(77, (Kind::Int64, Device::Cpu))
        .lt(10)
        .to_kind(Kind::Int64)
        .unsqueeze(0)
        .repeat([3, 1]);
    let padded = loaded.model.forward(&ids, Some(&mask)).unwrap();
    let head = |t: &Tensor| t.narrow(1, 0, 10);
    let err = fixtures::max_rel_err(
        &head(&padded.last_hidden_state),
        &head(&plain.last_hidden_state),
    );
    assert!(err <= 1e-6, "prefix changed: {err:.3e}");
    // Position 20 attends only to 0..10 now: it equals a run where positions 10..20
    // are invisible, which differs from the plain run.
    let diff = (padded.last_hidden_state.narrow(1, 20, 1)
        - plain.last_hidden_state.narrow(1, 20, 1))
    .abs()
    .max()
    .double_value(&[]);
    assert!(diff > 1e-4, "the padding mask had no effect");
}

/// Pooling: legacy configs (eos_token_id 2) take the argmax of the ids, others the
/// first position holding eos_token_id.
#[test]
fn pooled_position_rule() {
    let ids = Tensor::from_slice(&[320i64, 7, 500, 7, 320, 49000, 1, 1]).view([1, 8]);
    for (eos, expect) in [(2i64, 5i64), (7, 1)] {
        let mut cfg = ClipTextConfig::tiny();
        cfg.eos_token_id = eos;
        let vs = VarStore::new(Device::Cpu);
        let model = ClipTextModel::new(&vs.root(), &cfg, true).unwrap();
        let out = model.forward(&ids, None).unwrap();
        let want = out.last_hidden_state.select(1, expect);
        assert_eq!(
            fixtures::max_rel_err(&out.pooler_output, &want),
            0.0,
            "eos_token_id {eos}"
        );
        assert_eq!(out.hidden_states.len(), cfg.num_hidden_layers as usize + 1);
        assert_eq!(out.text_embeds.unwrap().size(), [1, cfg.projection_dim]);
    }
}

/// The frozen encoder stays differentiable: gradients reach the token embedding.
#[test]
fn gradients_flow() {
    let vs = VarStore::new(Device::Cpu);
    let cfg = ClipTextConfig::tiny();
    let model = ClipTextModel::new(&vs.root(), &cfg, true).unwrap();
    let ids = Tensor::from_slice(&[49406i64, 320, 1125, 49407]).view([1, 4]);
    let out = model.forward(&ids, None).unwrap();
    let loss = out.penultimate().pow_tensor_scalar(2).sum(Kind::Float)
        + out.text_embeds.unwrap().sum(Kind::Float);
    loss.backward();
    let vars = vs.variables();
    let g = vars["text_model.embeddings.token_embedding.weight"].grad();
    assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let g = vars["text_projection.weight"].grad();
    assert!(g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn presets_have_checkpoint_names() {
    let vs = VarStore::new(Device::Cpu);
    let _ = ClipTextModel::new(&vs.root(), &ClipTextConfig::tiny(), false).unwrap();
    let vars = vs.variables();
    for n in [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.1.self_attn.out_proj.bias",
        "text_model.encoder.layers.0.mlp.fc2.weight",
        "text_model.final_layer_norm.weight",
    ] {
        assert!(vars.contains_key(n), "missing {n}");
    }
    let c = ClipTextConfig::sd15();
    assert_eq!(
        (
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.intermediate_size
        ),
        (768, 12, 12, 3072)
    );
    assert_eq!(c.hidden_act, "quick_gelu");
}

/// Loading converts the weights to the requested kind; bfloat16 stays close to the
/// float32 reference.
#[test]
fn loads_in_bfloat16() {
    let loaded = ClipTextModel::load(
        &fixtures::dir("clip_text_proj"),
        Device::Cpu,
        Kind::BFloat16,
    )
    .unwrap();
    assert!(loaded
        .vs
        .variables()
        .values()
        .all(|v| v.kind() == Kind::BFloat16));
    let io = fixtures::io("clip_text_proj").unwrap();
    let out = tch::no_grad(|| loaded.model.forward(&io["prompts.in.input_ids"], None)).unwrap();
    let err = fixtures::max_rel_err(&out.text_embeds.unwrap(), &io["prompts.out.text_embeds"]);
    println!("bfloat16 text_embeds: max rel err {err:.3e}");
    assert!(err < 0.1, "{err}");
}
