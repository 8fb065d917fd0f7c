//! Decoding (with header-only size checks) and training preprocessing.

use super::bad::BadKind;
use super::config::CropMode;
use image::{
    ColorType, DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, Rgb32FImage, RgbImage,
};
use rand::Rng;
use std::io::Cursor;
use tch::{Kind, Tensor};

/// A decoded RGB image, upright (EXIF orientation applied), alpha composited on white.
/// 8-bit sources stay 8-bit; 16-bit and float sources keep their precision as f32 in [0, 1].
#[derive(Debug, Clone)]
pub enum DecodedImage {
    U8(RgbImage),
    F32(Rgb32FImage),
}

impl DecodedImage {
    /// (height, width)
    pub fn size(&self) -> (u32, u32) {
        match self {
            DecodedImage::U8(i) => (i.height(), i.width()),
            DecodedImage::F32(i) => (i.height(), i.width()),
        }
    }
}

fn describe_start(bytes: &[u8]) -> String {
    let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("first bytes {}", head.join(" "))
}

/// Decode an image from its bytes. The pixel count is checked against `max_pixels`
/// from the header alone, before any pixel data is decoded.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<DecodedImage, (BadKind, String)> {
    if bytes.is_empty() {
        return Err((BadKind::ZeroByte, "the file is empty".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| (BadKind::Corrupt, format!("reading the header: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP)) => f,
        Some(f) => {
            return Err((
                BadKind::NotAnImage,
                format!("{f:?} images are not supported (JPEG, PNG and WebP are)"),
            ))
        }
        None => {
            return Err((
                BadKind::NotAnImage,
                format!(
                    "the content is not a JPEG, PNG or WebP image ({})",
                    describe_start(bytes)
                ),
            ))
        }
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    // Largest buffer the decoder may allocate: RGBA f32 of max_pixels pixels.
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    // Building the decoder reads the header only.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| (BadKind::Corrupt, format!("bad {format:?} header: {e}")))?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err((
            BadKind::TooLarge,
            format!("{w}x{h} = {pixels} pixels exceeds max_pixels = {max_pixels}"),
        ));
    }
    if pixels == 0 {
        return Err((
            BadKind::Corrupt,
            format!("the header announces an empty {w}x{h} image"),
        ));
    }
    let orientation = decoder.orientation().map_err(|e| {
        (
            BadKind::Corrupt,
            format!("reading the EXIF orientation: {e}"),
        )
    })?;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
    }
    let mut img = DynamicImage::from_decoder(decoder)
        .map_err(|e| (BadKind::Corrupt, format!("decoding {format:?} data: {e}")))?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// The JPEG decoder conceals truncated entropy data (filling the rest with grey), so
/// completeness is checked from the markers: walking the header segments to the first
/// scan of the main image, an end-of-image marker must follow it. (Thumbnails in
/// APP segments are skipped by their lengths; data appended after the image, such as
/// motion-photo video, does not matter.)
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), (BadKind, String)> {
    let truncated = |why: &str| Err((BadKind::Corrupt, format!("truncated JPEG: {why}")));
    let n = bytes.len();
    let mut i = 2; // after SOI
    loop {
        while i < n && bytes[i] != 0xFF {
            i += 1;
        }
        while i + 1 < n && bytes[i + 1] == 0xFF {
            i += 1; // fill bytes
        }
        if i + 1 >= n {
            return truncated("the file ends inside the header segments");
        }
        let marker = bytes[i + 1];
        match marker {
            0xDA => {
                return if bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]) {
                    Ok(())
                } else {
                    truncated(&format!(
                        "no end-of-image marker after the image data ({n} bytes)"
                    ))
                };
            }
            0xD9 => return truncated("end-of-image marker before any image data"),
            0x01 | 0xD0..=0xD8 => i += 2,
            _ => {
                if i + 3 >= n {
                    return truncated("the file ends inside the header segments");
                }
                let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                i += 2 + len;
            }
        }
    }
}

fn composite_u8(rgba: image::RgbaImage) -> RgbImage {
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p.0[3] as u32;
        for c in 0..3 {
            // c * a + 255 * (255 - a), divided by 255 with rounding.
            let v = p.0[c] as u32 * a + 255 * (255 - a);
            o.0[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}

fn composite_f32(rgba: image::Rgba32FImage) -> Rgb32FImage {
    let (w, h) = rgba.dimensions();
    let mut out = Rgb32FImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p.0[3].clamp(0.0, 1.0);
        for c in 0..3 {
            o.0[c] = p.0[c] * a + (1.0 - a);
        }
    }
    out
}

fn to_rgb(img: DynamicImage) -> DecodedImage {
    let high_precision = matches!(
        img.color(),
        ColorType::L16
            | ColorType::La16
            | ColorType::Rgb16
            | ColorType::Rgba16
            | ColorType::Rgb32F
            | ColorType::Rgba32F
    );
    match (high_precision, img.color().has_alpha()) {
        (false, false) => DecodedImage::U8(img.into_rgb8()),
        (false, true) => DecodedImage::U8(composite_u8(img.into_rgba8())),
        (true, false) => DecodedImage::F32(img.into_rgb32f()),
        (true, true) => DecodedImage::F32(composite_f32(img.into_rgba32f())),
    }
}

/// Resize on the shortest side, crop and flip to the training resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    pub height: u32,
    pub width: u32,
    pub crop: CropMode,
    pub flip: bool,
}

/// A preprocessed sample: CHW pixels in [-1, 1] and its SDXL micro-conditioning.
#[derive(Debug)]
pub struct Preprocessed {
    /// `[3, height, width]` f32 in [-1, 1] on the CPU.
    pub pixels: Tensor,
    /// (height, width) of the upright source image.
    pub original_size: (u32, u32),
    /// (top, left) of the crop in the resized (and, when flipped, mirrored) image.
    pub crop_top_left: (u32, u32),
    pub flipped: bool,
}

/// Python's round(): halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

impl Transform {
    /// The size the image is resized to before cropping: the smallest size that covers
    /// the target with the source aspect ratio.
    pub fn resized_size(&self, src_h: u32, src_w: u32) -> (u32, u32) {
        let scale = (self.height as f64 / src_h as f64).max(self.width as f64 / src_w as f64);
        let rh = ((src_h as f64 * scale).round() as u32).max(self.height);
        let rw = ((src_w as f64 * scale).round() as u32).max(self.width);
        (rh, rw)
    }

    /// Apply the transform; random choices (crop offset, flip) are drawn from `rng`.
    pub fn apply<R: Rng>(&self, img: &DecodedImage, rng: &mut R) -> Preprocessed {
        let original_size = img.size();
        let (rh, rw) = self.resized_size(original_size.0, original_size.1);
        let flipped = self.flip && rng.gen_bool(0.5);
        let (top, left) = match self.crop {
            CropMode::Center => (
                round_half_even((rh - self.height) as f64 / 2.0) as u32,
                round_half_even((rw - self.width) as f64 / 2.0) as u32,
            ),
            CropMode::Random => (
                rng.gen_range(0..=rh - self.height),
                rng.gen_range(0..=rw - self.width),
            ),
        };
        // The crop offset is given in the (possibly mirrored) resized image; in the
        // unmirrored image the same region starts at rw - width - left.
        let src_left = if flipped {
            rw - self.width - left
        } else {
            left
        };
        let (sh, sw) = (original_size.0 as i64, original_size.1 as i64);
        // [3, H, W] f32 on the 0..255 scale; the pixel work runs in libtorch.
        let x = match img {
            DecodedImage::U8(src) => Tensor::from_slice(src.as_raw())
                .view([sh, sw, 3])
                .permute([2, 0, 1])
                .to_kind(Kind::Float),
            DecodedImage::F32(src) => {
                Tensor::from_slice(src.as_raw())
                    .view([sh, sw, 3])
                    .permute([2, 0, 1])
                    * 255.0
            }
        };
        let x = if (rh, rw) == original_size {
            x
        } else {
            // Antialiased bicubic (Keys a = -0.5 with the kernel widened when shrinking,
            // like Pillow's BICUBIC and torchvision's Resize(antialias=True)).
            x.unsqueeze(0)
                .internal_upsample_bicubic2d_aa([rh as i64, rw as i64], false, None, None)
                .squeeze_dim(0)
                .clamp(0.0, 255.0)
        };
        let x = x.narrow(1, top as i64, self.height as i64).narrow(
            2,
            src_left as i64,
            self.width as i64,
        );
        let x = if flipped { x.flip([2]) } else { x };
        let pixels = (x / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous();
        Preprocessed {
            pixels,
            original_size,
            crop_top_left: (top, left),
            flipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_rounding() {
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(1.5), 2.0);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(2.4), 2.0);
        assert_eq!(round_half_even(3.0), 3.0);
    }

    #[test]
    fn resized_size_covers_target() {
        let t = Transform {
            height: 512,
            width: 512,
            crop: CropMode::Center,
            flip: false,
        };
        assert_eq!(t.resized_size(1000, 2000), (512, 1024));
        assert_eq!(t.resized_size(300, 200), (768, 512));
        let t = Transform {
            height: 256,
            width: 512,
            crop: CropMode::Center,
            flip: false,
        };
        assert_eq!(t.resized_size(512, 512), (512, 512));
        assert_eq!(t.resized_size(100, 1000), (256, 2560));
    }
}
