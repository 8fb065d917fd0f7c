//! Networks, written on tch, loading the diffusers / transformers layouts directly.
pub mod blocks;
pub mod clip;
pub mod config;
pub mod dinov2;
pub mod efficientnet;
pub mod mmdit;
pub mod pipeline;
pub mod sd3_text;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
