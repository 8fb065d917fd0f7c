//! Block-wise 8-bit storage of optimiser moments, as bitsandbytes' 8-bit optimisers do
//! it (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"): a tensor is cut
//! into blocks of [`BLOCK`] values, each block is scaled by its largest magnitude
//! (kept in float32), and each scaled value is stored as the index (one byte) of the
//! nearest of 256 values of the *dynamic* map (`create_dynamic_map` of bitsandbytes:
//! a decimal exponent from 10^-6 to 10^0 and a linear fraction whose resolution grows
//! with the exponent). The first moment uses the signed map, the second (non-negative)
//! the unsigned one, which spends the sign bit on resolution.
//!
//! Storage: 1 byte per value plus 4 bytes per block (0.002 bytes per value), against 4
//! bytes in float32.

use tch::{Device, Kind, Tensor};

/// Values per block (the block size of the paper).
pub const BLOCK: i64 = 2048;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits = 7, total_bits = 8)`:
/// 256 values in [-1, 1] (signed) or [0, 1] (unsigned), sorted.
pub fn dynamic_map(signed: bool) -> Vec<f64> {
    let max_exp = 7;
    let non_sign_bits = 7;
    let mut data = Vec::new();
    let linspace = |n: usize| -> Vec<f64> {
        (0..n)
            .map(|i| 0.1 + 0.9 * i as f64 / (n - 1) as f64)
            .collect()
    };
    for i in 0..max_exp {
        let items = if signed {
            (1usize << (i + non_sign_bits - max_exp)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exp + 1)) + 1
        };
        let b = linspace(items);
        let scale = 10f64.powi(-(max_exp - 1) + i);
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    // bitsandbytes pads with zeros up to 256 values (the signed map has 256 already).
    while data.len() < 256 {
        data.push(0.0);
    }
    data.sort_by(|a, b| a.partial_cmp(b).unwrap());
    data
}

/// A tensor stored block-wise in 8 bits.
#[derive(Debug)]
pub struct Quantized {
    /// `[blocks, BLOCK]` uint8 indices into the map.
    codes: Tensor,
    /// `[blocks, 1]` float32 scale of each block.
    absmax: Tensor,
    shape: Vec<i64>,
    numel: i64,
    /// The 256 map values (float32) and the 255 midpoints between them.
    map: Tensor,
    mids: Tensor,
}

impl Quantized {
    /// Zeros of the shape of `like`, on its device.
    pub fn zeros(like: &Tensor, signed: bool) -> Quantized {
        let mut q = Quantized::empty(like.size(), like.device(), signed);
        q.store(&like.zeros_like().to_kind(Kind::Float));
        q
    }

    fn empty(shape: Vec<i64>, device: Device, signed: bool) -> Quantized {
        let numel: i64 = shape.iter().product();
        let blocks = (numel + BLOCK - 1) / BLOCK;
        let map_v = dynamic_map(signed);
        let mids: Vec<f32> = map_v
            .windows(2)
            .map(|w| ((w[0] + w[1]) / 2.0) as f32)
            .collect();
        let map_f: Vec<f32> = map_v.iter().map(|&x| x as f32).collect();
        Quantized {
            codes: Tensor::zeros([blocks, BLOCK], (Kind::Uint8, device)),
            absmax: Tensor::zeros([blocks, 1], (Kind::Float, device)),
            shape,
            numel,
            map: Tensor::from_slice(&map_f).to_device(device),
            mids: Tensor::from_slice(&mids).to_device(device),
        }
    }

    /// Quantise `x` (any float kind, this tensor's shape) into this storage.
    pub fn store(&mut self, x: &Tensor) {
        let blocks = self.codes.size()[0];
        let flat = x.to_kind(Kind::Float).reshape([-1]);
        let pad = blocks * BLOCK - self.numel;
        let flat = if pad > 0 {
            Tensor::cat(&[flat, Tensor::zeros([pad], (Kind::Float, x.device()))], 0)
        } else {
            flat
        };
        let b = flat.view([blocks, BLOCK]);
        let absmax = b.abs().amax([1i64].as_slice(), true);
        // An all-zero block: any scale works.
        let scale = absmax.where_self(&absmax.gt(0.0), &absmax.ones_like());
        let normed = b / &scale;
        let idx = Tensor::bucketize(&normed, &self.mids, false, false);
        self.codes = idx.to_kind(Kind::Uint8);
        self.absmax = scale;
    }

    /// The stored values in float32, in the original shape.
    pub fn load(&self) -> Tensor {
        let v = self
            .map
            .index_select(0, &self.codes.reshape([-1]).to_kind(Kind::Int64))
            .view([-1, BLOCK])
            * &self.absmax;
        v.reshape([-1])
            .narrow(0, 0, self.numel)
            .view(self.shape.as_slice())
    }

    /// The stored codes (`[blocks, BLOCK]` uint8) and block scales (`[blocks, 1]`
    /// float32), for checkpoints.
    pub fn parts(&self) -> (Tensor, Tensor) {
        (self.codes.shallow_clone(), self.absmax.shallow_clone())
    }

    /// Restore codes and scales written by [`Quantized::parts`] (exactly).
    pub fn set_parts(&mut self, codes: &Tensor, absmax: &Tensor) -> anyhow::Result<()> {
        anyhow::ensure!(
            codes.size() == self.codes.size() && absmax.size() == self.absmax.size(),
            "8-bit moments: codes {:?} / scales {:?}, expected {:?} / {:?}",
            codes.size(),
            absmax.size(),
            self.codes.size(),
            self.absmax.size()
        );
        self.codes = codes.to_kind(Kind::Uint8).to_device(self.codes.device());
        self.absmax = absmax.to_kind(Kind::Float).to_device(self.absmax.device());
        Ok(())
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> i64 {
        self.codes.numel() as i64 + 4 * self.absmax.numel() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_have_256_sorted_values_in_range() {
        for signed in [true, false] {
            let m = dynamic_map(signed);
            assert_eq!(m.len(), 256);
            assert!(m.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(*m.last().unwrap(), 1.0);
            assert_eq!(m[0], if signed { -0.99296875 } else { 0.0 });
        }
        // Signed: 127 positive values, 127 negative, 0 and 1 (bitsandbytes' layout).
        let s = dynamic_map(true);
        assert_eq!(s.iter().filter(|&&x| x > 0.0).count(), 128);
        assert_eq!(s.iter().filter(|&&x| x < 0.0).count(), 127);
        // The smallest positive value is 10^-6 times the first fraction midpoint.
        let min_pos = s.iter().cloned().filter(|&x| x > 0.0).fold(1.0, f64::min);
        assert!((min_pos - 0.55e-6).abs() < 1e-12, "{min_pos}");
    }

    #[test]
    fn round_trip_error_is_within_the_map_resolution() {
        tch::manual_seed(0);
        let x = Tensor::randn([3, 1500], (Kind::Float, Device::Cpu)) * 0.01;
        let mut q = Quantized::zeros(&x, true);
        q.store(&x);
        let y = q.load();
        assert_eq!(y.size(), x.size());
        // Relative to each block's absmax, the dynamic map's step near 1 is 1/64 of the
        // 0.1..1 decade (0.9 / 64 / 2 = 0.007 rounding error at most).
        let blocks_absmax = x.abs().max().double_value(&[]);
        let err = (&y - &x).abs().max().double_value(&[]);
        assert!(err <= 0.0071 * blocks_absmax, "{err} vs {blocks_absmax}");
        assert!(err > 0.0);
        // Values of the map itself round-trip exactly.
        let v = Tensor::from_slice(&[0.5f32, -0.25, 0.0, 1.0]);
        let mut q = Quantized::zeros(&v, true);
        q.store(&v);
        let back = q.load();
        let map = dynamic_map(true);
        for (i, &orig) in [0.5f64, -0.25, 0.0, 1.0].iter().enumerate() {
            let b = back.double_value(&[i as i64]);
            let nearest = map
                .iter()
                .cloned()
                .min_by(|a, c| (a - orig).abs().partial_cmp(&(c - orig).abs()).unwrap())
                .unwrap();
            assert!(
                (b - nearest).abs() < 1e-6,
                "{orig}: got {b}, nearest map value {nearest}"
            );
        }
        // Unsigned storage of non-negative values (the second moment).
        let v2 = (&x * &x).reshape([-1]);
        let mut q2 = Quantized::zeros(&v2, false);
        q2.store(&v2);
        let e2 = (q2.load() - &v2).abs().max().double_value(&[]);
        assert!(e2 <= 0.0036 * v2.max().double_value(&[]), "{e2}");
        // Codes are padded to whole blocks: 3 blocks of 2048, 3 scales.
        assert_eq!(q2.bytes(), 3 * 2048 + 4 * 3);
    }
}
