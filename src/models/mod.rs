//! Networks, written on tch, loading the diffusers / transformers layouts directly.
pub mod config;
pub mod dinov2;
pub mod efficientnet;
pub mod pipeline;
pub mod blocks;
pub mod unet;
pub mod vae;
pub mod clip;
pub mod tokenizer;
pub mod mmdit;
pub mod t5;
pub mod sd3_text;
