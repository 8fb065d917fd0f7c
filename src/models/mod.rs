//! Networks, written on tch, loading the diffusers / transformers layouts directly.
pub mod blocks;
pub mod checkpoint;
pub mod clip;
pub mod clip_vision;
pub mod config;
pub mod denoiser;
pub mod dinov2;
pub mod efficientnet;
pub mod inception;
pub mod lora;
pub mod master_copy;
pub mod mmdit;
pub mod pipeline;
pub mod sd3_text;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;

/// A named input of `adt forward`; a missing one is an error naming it.
pub fn forward_input<'a>(
    inputs: &'a std::collections::HashMap<String, tch::Tensor>,
    name: &str,
    component: &str,
) -> anyhow::Result<&'a tch::Tensor> {
    use anyhow::Context;
    inputs.get(name).with_context(|| {
        format!("{component}: missing input {name} (no tensor named \"{name}\" in the inputs file)")
    })
}
