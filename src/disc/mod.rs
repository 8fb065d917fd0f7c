//! The discriminator: a frozen feature network with trainable heads.

pub mod diffaug;
pub mod features;
pub mod heads;
pub mod siamese;

use tch::Tensor;

/// A frozen feature network F tapped at several levels.
///
/// `features` takes images in [-1, 1] of shape [B, 3, H, W] (any resolution: the
/// implementation resizes to its own input size and normalises as it was trained)
/// and returns one tensor of shape [B, C_i, N_i] per tapped level (N_i spatial
/// positions or patch tokens). It must be differentiable with respect to `images`
/// while its own weights stay frozen.
pub trait FeatureNetwork {
    fn features(&self, images: &Tensor) -> Vec<Tensor>;
    /// Channel count C_i of each tapped level.
    fn channels(&self) -> Vec<i64>;
}
