//! Parity of the T5 encoder against the transformers reference outputs, plus loading
//! variants (tied embedding stored under the encoder's name, half precision).

mod common;

use adt::models::t5::{run_forward, T5Config, T5EncoderModel};
use common::fixtures;
use std::collections::HashMap;
use tch::{nn::VarStore, Device, Kind, Tensor};

const TOL: f64 = 1e-4;
const NAME: &str = "t5_encoder";

fn call_inputs(call: &serde_json::Value, io: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut inputs = HashMap::new();
    for (arg, spec) in call["kwargs"].as_object().expect("kwargs object") {
        let key = spec["tensor"].as_str().expect("tensor kwarg");
        inputs.insert(arg.clone(), io[key].shallow_clone());
    }
    inputs
}

/// Run every call of the fixture through `run_forward` on `dir`; returns
/// `(call, output, error)` for every output.
fn errors(dir: &std::path::Path) -> Vec<(String, String, f64)> {
    let case = fixtures::case(NAME).unwrap();
    let io = fixtures::io(NAME).unwrap();
    let mut out = Vec::new();
    for call in case["calls"].as_array().unwrap() {
        let inputs = call_inputs(call, &io);
        let outs = run_forward("t5", dir, &inputs).unwrap();
        let expected = call["outputs"].as_object().unwrap();
        assert_eq!(outs.len(), expected.len());
        for (out_name, key) in expected {
            let ours = &outs[out_name];
            let err = fixtures::max_rel_err(ours, &io[key.as_str().unwrap()]);
            out.push((
                call["name"].as_str().unwrap().to_string(),
                out_name.clone(),
                err,
            ));
        }
    }
    out
}

#[test]
fn t5_encoder_matches_transformers() {
    let errs = errors(&fixtures::dir(NAME));
    assert_eq!(errs.len(), 2, "both calls (no_mask, masked) are checked");
    for (call, out, err) in errs {
        println!("{NAME} {call} {out}: max rel err {err:.3e}");
        assert!(err <= TOL, "{call} {out}: {err:.3e} > {TOL:.0e}");
    }
}

/// The padding mask changes the result (so the masked call tests something), and
/// only through the masked keys.
#[test]
fn mask_matters() {
    let io = fixtures::io(NAME).unwrap();
    let a = &io["no_mask.out.last_hidden_state"];
    let b = &io["masked.out.last_hidden_state"];
    assert!(fixtures::max_rel_err(a, b) > 1e-3);
    let mask = &io["masked.in.attention_mask"];
    assert!(mask.eq(0).any().int64_value(&[]) != 0);
}

/// Older checkpoints store the tied embedding as `encoder.embed_tokens.weight` too, or
/// only under that name: both load to the same outputs.
#[test]
fn loads_embed_tokens_variants() {
    let src = fixtures::dir(NAME);
    let tensors = adt::weights::read_safetensors(&src.join("model.safetensors")).unwrap();
    let shared = tensors
        .iter()
        .find(|(n, _)| n == "shared.weight")
        .unwrap()
        .1
        .shallow_clone();
    for keep_shared in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let mut named: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(n, _)| keep_shared || n != "shared.weight")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        named.push(("encoder.embed_tokens.weight".into(), shared.copy()));
        adt::weights::save_safetensors(&named, &tmp.path().join("model.safetensors"), None, None)
            .unwrap();
        for (call, out, err) in errors(tmp.path()) {
            println!("embed_tokens variant (shared kept: {keep_shared}) {call} {out}: {err:.3e}");
            assert!(err <= TOL);
        }
    }
}

/// A missing tensor is an error naming it.
#[test]
fn missing_tensor_is_named() {
    let src = fixtures::dir(NAME);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let named: Vec<(String, Tensor)> =
        adt::weights::read_safetensors(&src.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != "encoder.final_layer_norm.weight")
            .collect();
    adt::weights::save_safetensors(&named, &tmp.path().join("model.safetensors"), None, None)
        .unwrap();
    let err = match T5EncoderModel::load(tmp.path(), Device::Cpu, Kind::Float) {
        Ok(_) => panic!("loading succeeded without encoder.final_layer_norm.weight"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("encoder.final_layer_norm.weight"), "{err}");
}

/// Half precision keeps `wo` in float32 (as transformers does) and stays close to the
/// float32 result.
#[test]
fn half_precision_keeps_wo_in_float32() {
    let dir = fixtures::dir(NAME);
    let io = fixtures::io(NAME).unwrap();
    let loaded = T5EncoderModel::load(&dir, Device::Cpu, Kind::Half).unwrap();
    for (name, var) in loaded.vs.variables() {
        let want = if name.ends_with("DenseReluDense.wo.weight") {
            Kind::Float
        } else {
            Kind::Half
        };
        assert_eq!(var.kind(), want, "{name}");
        assert!(!var.requires_grad(), "{name} should be frozen");
    }
    let out = tch::no_grad(|| loaded.model.forward(&io["no_mask.in.input_ids"], None)).unwrap();
    let err = fixtures::max_rel_err(&out, &io["no_mask.out.last_hidden_state"]);
    println!("{NAME} half precision: max rel err {err:.3e}");
    assert!(err < 2e-2, "{err:.3e}");
}

/// Gradients reach every parameter, the relative-position table included (through
/// the attention bias), for a non-gated ReLU variant too.
#[test]
fn gradients_reach_every_parameter() {
    for proj in ["gated-gelu", "relu"] {
        tch::manual_seed(3);
        let mut cfg = T5Config::tiny();
        cfg.feed_forward_proj = proj.into();
        let vs = VarStore::new(Device::Cpu);
        let model = T5EncoderModel::new(&vs.root(), &cfg).unwrap();
        let ids = Tensor::randint(cfg.vocab_size, [2, 30], (Kind::Int64, Device::Cpu));
        let mask = Tensor::ones([2, 30], (Kind::Int64, Device::Cpu));
        let _ = mask.narrow(1, 20, 10).get(1).fill_(0);
        let out = model.forward(&ids, Some(&mask)).unwrap();
        let r = Tensor::randn(out.size(), (Kind::Float, Device::Cpu));
        (out * r).sum(Kind::Float).backward();
        let vars = vs.variables();
        // shared + per block (2 norms, q/k/v/o, wi or wi_0/wi_1, wo) + bias table + final norm.
        let per_block = if proj == "relu" { 8 } else { 9 };
        assert_eq!(
            vars.len(),
            1 + 2 * per_block + 1 + 1,
            "{proj}: {:?}",
            vars.keys().collect::<Vec<_>>()
        );
        for (name, v) in vars {
            let g = v.grad();
            assert!(g.defined(), "{proj} {name}: no gradient");
            let n = g.abs().sum(Kind::Double).double_value(&[]);
            assert!(n > 0.0 && n.is_finite(), "{proj} {name}: gradient norm {n}");
        }
    }
}
