//! The image processors of transformers, as a `preprocessor_config.json` describes them:
//! `CLIPImageProcessor` (resize the shortest side, center crop) and `ViTImageProcessor` (resize to
//! a fixed size), each followed by rescaling and mean/std normalization.
//!
//! The slow (PIL) processors are the reference: transformers converts the image to RGB, resizes it
//! with `PIL.Image.resize`, crops, then computes `(px · rescale_factor − mean) / std` in float32.
//! [`pil_resize`] reproduces Pillow's 8-bit separable resampling (`libImaging/Resample.c`: an
//! antialiasing filter whose support widens with the downscale factor, 22-bit fixed-point
//! coefficients, the horizontal pass first, each pass rounded to 8 bits) so images of any size
//! give the reference's pixel values, not only images already at the model's size.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;
use std::path::Path;

/// Pillow's resampling filters (`PIL.Image.Resampling`), by their integer codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    /// The `resample` code of a preprocessor config (0 = nearest is refused: it is another
    /// algorithm, not a filter).
    pub fn from_code(code: i64) -> Result<Self> {
        Ok(match code {
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            other => bail!(
                "unsupported resample {other} (supported: 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"
            ),
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                return 1.0;
            }
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                // Keys' cubic with a = −0.5, as Pillow.
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index, and the fixed-point weights of the inputs it reads.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero; negatives clamp to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            let one = (1i64 << PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((width, height), filter)` of an 8-bit RGB image, bit for bit (Pillow 13).
///
/// When both passes are needed Pillow 13 runs the vertical one first if the height shrinks by
/// more than twice as many pixels as the width does (PR #9549; ties go horizontal first), else
/// the horizontal one; each pass rounds to 8 bits, so the order changes the result.
pub fn pil_resize(img: &RgbImage, width: usize, height: usize, filter: Resample) -> RgbImage {
    let (w0, h0) = (img.width() as i64, img.height() as i64);
    let (w, h) = (width as i64, height as i64);
    let vertical_first = w != w0 && h != h0 && h0 - h > 0 && h0 - h > 2 * (w0 - w);
    if vertical_first {
        let v = resample_vertical(img, height, filter);
        resample_horizontal(&v, width, filter)
    } else {
        let mut cur = img.clone();
        if w != w0 {
            cur = resample_horizontal(&cur, width, filter);
        }
        if h != h0 {
            cur = resample_vertical(&cur, height, filter);
        }
        cur
    }
}

fn resample_horizontal(img: &RgbImage, width: usize, filter: Resample) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let coeffs = coefficients(w0, width, filter);
    let mut out = RgbImage::new(width as u32, h0 as u32);
    for y in 0..h0 {
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                let mut ss = 1i64 << (PRECISION_BITS - 1);
                for (i, &kw) in k.iter().enumerate() {
                    ss += img.get_pixel((xmin + i) as u32, y as u32).0[c] as i64 * kw;
                }
                *v = clip8(ss);
            }
            out.put_pixel(xx as u32, y as u32, image::Rgb(px));
        }
    }
    out
}

fn resample_vertical(img: &RgbImage, height: usize, filter: Resample) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let coeffs = coefficients(h0, height, filter);
    let mut out = RgbImage::new(w0 as u32, height as u32);
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..w0 {
            let mut px = [0u8; 3];
            for (c, v) in px.iter_mut().enumerate() {
                let mut ss = 1i64 << (PRECISION_BITS - 1);
                for (i, &kw) in k.iter().enumerate() {
                    ss += img.get_pixel(x as u32, (ymin + i) as u32).0[c] as i64 * kw;
                }
                *v = clip8(ss);
            }
            out.put_pixel(x as u32, yy as u32, image::Rgb(px));
        }
    }
    out
}

/// How an image is resized before cropping.
#[derive(Clone, Debug, PartialEq)]
pub enum ResizeTo {
    /// The shorter side to this length, the aspect ratio kept (CLIP).
    ShortestEdge(usize),
    /// Exactly `height × width` (ViT).
    Exact { height: usize, width: usize },
}

/// A `preprocessor_config.json`.
#[derive(Clone, Debug)]
pub struct ImageProcessor {
    pub resize: Option<(ResizeTo, Resample)>,
    pub center_crop: Option<(usize, usize)>,
    pub rescale_factor: Option<f64>,
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

fn three(v: &Value, key: &str, path: &Path) -> Result<[f32; 3]> {
    let a = v
        .get(key)
        .and_then(|a| a.as_array())
        .with_context(|| format!("{}: '{key}' must be a list of 3 numbers", path.display()))?;
    let nums: Vec<f32> = a
        .iter()
        .filter_map(|x| x.as_f64())
        .map(|x| x as f32)
        .collect();
    match nums.as_slice() {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("{}: '{key}' must be a list of 3 numbers", path.display()),
    }
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(|b| b.as_bool()).unwrap_or(true)
}

/// `{"height": h, "width": w}` or an int (square).
fn hw(v: &Value) -> Option<(usize, usize)> {
    if let Some(n) = v.as_u64() {
        return Some((n as usize, n as usize));
    }
    Some((
        v.get("height")?.as_u64()? as usize,
        v.get("width")?.as_u64()? as usize,
    ))
}

impl ImageProcessor {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("{}: cannot read the image processor config", path.display())
        })?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let kind = v
            .get("image_processor_type")
            .and_then(|k| k.as_str())
            .or_else(|| v.get("feature_extractor_type").and_then(|k| k.as_str()))
            .unwrap_or("CLIPImageProcessor");
        let clip_like = kind.starts_with("CLIP") || kind.starts_with("Bit");
        if !clip_like && !kind.starts_with("ViT") {
            bail!(
                "{}: unsupported image processor '{kind}' (supported: CLIPImageProcessor, ViTImageProcessor, BitImageProcessor)",
                path.display()
            )
        }
        let resize = if flag(v, "do_resize") {
            let size = v
                .get("size")
                .with_context(|| format!("{}: do_resize without a size", path.display()))?;
            let to = if let Some(s) = size.get("shortest_edge").and_then(|s| s.as_u64()) {
                ResizeTo::ShortestEdge(s as usize)
            } else if let (true, Some(n)) = (clip_like, size.as_u64()) {
                // Old CLIP configs give `size: 224`, meaning the shortest edge.
                ResizeTo::ShortestEdge(n as usize)
            } else if let Some((height, width)) = hw(size) {
                ResizeTo::Exact { height, width }
            } else {
                bail!("{}: unsupported size {size}", path.display())
            };
            let code = v
                .get("resample")
                .and_then(|r| r.as_i64())
                .unwrap_or(if clip_like { 3 } else { 2 });
            let filter =
                Resample::from_code(code).with_context(|| format!("{}", path.display()))?;
            Some((to, filter))
        } else {
            None
        };
        let center_crop = if v
            .get("do_center_crop")
            .and_then(|b| b.as_bool())
            .unwrap_or(clip_like)
        {
            let crop = v.get("crop_size").and_then(hw).with_context(|| {
                format!("{}: do_center_crop without a crop_size", path.display())
            })?;
            Some(crop)
        } else {
            None
        };
        let rescale_factor = if flag(v, "do_rescale") {
            Some(
                v.get("rescale_factor")
                    .and_then(|r| r.as_f64())
                    .unwrap_or(1.0 / 255.0),
            )
        } else {
            None
        };
        let mean_std = if flag(v, "do_normalize") {
            Some((three(v, "image_mean", path)?, three(v, "image_std", path)?))
        } else {
            None
        };
        Ok(Self {
            resize,
            center_crop,
            rescale_factor,
            mean_std,
        })
    }

    /// The size the model sees (the crop, else the exact resize).
    pub fn output_size(&self) -> Option<(usize, usize)> {
        if let Some(c) = self.center_crop {
            return Some(c);
        }
        match &self.resize {
            Some((ResizeTo::Exact { height, width }, _)) => Some((*height, *width)),
            _ => None,
        }
    }

    /// Resize and crop, in 8 bits, as the reference does before converting to floats.
    pub fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let mut img = img.clone();
        if let Some((to, filter)) = &self.resize {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (nh, nw) = match *to {
                ResizeTo::Exact { height, width } => (height, width),
                ResizeTo::ShortestEdge(s) => {
                    // transformers' get_resize_output_image_size(default_to_square=False).
                    let (short, long) = if w <= h { (w, h) } else { (h, w) };
                    let new_long = (s as f64 * long as f64 / short as f64) as usize;
                    if w <= h {
                        (new_long, s)
                    } else {
                        (s, new_long)
                    }
                }
            };
            img = pil_resize(&img, nw, nh, *filter);
        }
        if let Some((ch, cw)) = self.center_crop {
            img = center_crop(&img, ch, cw);
        }
        img
    }

    /// `pixel_values [3, H, W]` of one image.
    pub fn preprocess(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        let img = self.resize_and_crop(img);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = vec![0f32; 3 * h * w];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                let mut v = p.0[c] as f32;
                if let Some(f) = self.rescale_factor {
                    // numpy: uint8 → float64 · factor → float32.
                    v = (p.0[c] as f64 * f) as f32;
                }
                if let Some((mean, std)) = &self.mean_std {
                    v = (v - mean[c]) / std[c];
                }
                out[c * h * w + y as usize * w + x as usize] = v;
            }
        }
        Ok(Tensor::from_vec(out, (3, h, w), device)?)
    }

    /// `pixel_values [N, 3, H, W]` of several images (they must come out the same size).
    pub fn preprocess_batch(&self, imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
        let ts = imgs
            .iter()
            .map(|i| self.preprocess(i, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&ts, 0)?)
    }
}

/// transformers' `center_crop`: the window at `(H − h) // 2`, `(W − w) // 2` (floor division), with
/// zeros where it reaches past the image (transformers pads the image centred by
/// `ceil((h − H) / 2)` first, which puts the window at the same place).
pub fn center_crop(img: &RgbImage, ch: usize, cw: usize) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let top = (h - ch as i64).div_euclid(2);
    let left = (w - cw as i64).div_euclid(2);
    RgbImage::from_fn(cw as u32, ch as u32, |x, y| {
        let (sx, sy) = (left + x as i64, top + y as i64);
        if sx >= 0 && sy >= 0 && sx < w && sy < h {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// Opens an image as transformers' `convert_rgb` does: opaque images converted to RGB (gray
/// replicated), images with alpha composited onto opaque white, rounding half up.
pub fn read_image_rgb(path: &Path) -> Result<RgbImage> {
    let img: DynamicImage = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open image", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read image", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    Ok(convert_rgb(img))
}

/// See [`read_image_rgb`].
pub fn convert_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as u32;
        // round((c·a + 255·(255 − a)) / 255), halves up, in integers.
        let mix = |c: u8| ((2 * (c as u32 * a + 255 * (255 - a)) + 255) / 510) as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}
