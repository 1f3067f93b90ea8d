//! Training images: finding and loading them, augmenting them, and caching their VAE latents.
//!
//! This module is responsible for everything between a folder of photos and the latent
//! distribution a training step samples from:
//!
//! - [`load_image_folder`] reads every JPEG, PNG and WebP file of a folder (recognized by content),
//!   turned upright per its EXIF orientation and with any alpha composited onto white. Beside an
//!   image `cat.jpg`, a file `cat.txt` holds its caption and `cat.mask.png` its subject mask
//!   (white = subject). Files that cannot be used are skipped with a warning naming them.
//! - [`Augment`] describes the augmentation (resolution, crop, flip). It does not produce pixels:
//!   it draws a [`Variant`], a small hashable value naming one augmented view of one image, which
//!   [`render`] (and [`render_mask`]) turn into tensors. [`TrainImage::resized_for`] shrinks a
//!   photo once to its training size so that rendering is only a crop.
//! - [`LatentCache`] remembers the VAE's latent distribution for each variant it has seen, so the
//!   frozen VAE encoder runs once per variant instead of once per step. It stores the
//!   distribution (mean and log-variance), not a sample, so every step still draws fresh latent
//!   noise, as diffusers' scripts do with `vae.encode(x).latent_dist.sample()`.
//!
//! Choosing captions (an image's own caption or a [template](crate::templates)), batching and
//! moving tensors to the training device belong to the trainer.
//!
//! ```no_run
//! use imprint_train::data::{load_image_folder, Augment, Crop, render};
//! use rand::SeedableRng;
//! # fn main() -> anyhow::Result<()> {
//! let folder = load_image_folder("photos/".as_ref(), 256)?;
//! for warning in &folder.warnings {
//!     eprintln!("warning: {warning}");
//! }
//! let augment = Augment { resolution: 512, crop: Crop::Center, flip: true };
//! // Shrink each photo once to its training size; rendering is then only cropping.
//! let images: Vec<_> = folder.images.iter().map(|i| i.resized_for(512)).collect();
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let variant = augment.sample_variant(&images, 0, &mut rng);
//! let pixels = render(&images[0], &variant, augment.resolution)?; // [3, 512, 512]
//! # Ok(()) }
//! ```

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::{self, FilterType};
use image::metadata::Orientation;
use image::{
    DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader, Pixel, RgbImage,
};
use imprint_models::vae::LatentDistribution;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The suffix that marks a subject mask (`cat.mask.png` belongs to `cat.jpg`).
const MASK_SUFFIX: &str = ".mask.png";

/// Bicubic resampling for pixels: Catmull–Rom is the kernel of PIL's `BICUBIC` (a = −0.5), which
/// diffusers' TI script uses, and the image crate widens it when downscaling as PIL antialiases.
const RGB_FILTER: FilterType = FilterType::CatmullRom;

/// Bilinear resampling for masks: a bicubic kernel would ring around the subject's edge.
const MASK_FILTER: FilterType = FilterType::Triangle;

/// One training image, upright and opaque, with what was found beside it.
#[derive(Debug, Clone)]
pub struct TrainImage {
    pub path: PathBuf,
    /// Oriented per EXIF, alpha composited onto white.
    pub rgb: image::RgbImage,
    /// The trimmed contents of `IMAGE.txt` (same stem, `.txt`); `None` if absent or blank.
    pub caption: Option<String>,
    /// `IMAGE.mask.png` as luminance (white = subject), oriented per its own EXIF, the same size
    /// as `rgb`. Transparent mask pixels count as background.
    pub mask: Option<GrayImage>,
    /// Where each subject of a cut-mix image lies ([`cut_mix`]); empty for ordinary images.
    /// Cut-mix images are never flipped: their caption says which side each subject is on.
    pub regions: Vec<SubjectRegion>,
}

/// A subject's place in a cut-mix image: the phrase naming it in the caption and the columns it
/// covers, `[start, end)` in pixels of the image.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectRegion {
    pub phrase: String,
    pub columns: (u32, u32),
}

/// SVDiff's cut-mix samples (Han et al. 2023, §3.3): for every pair of an image of subject A and
/// one of subject B (both sides; at most `limit` images, spread evenly over the pairs), a
/// `resolution`² image whose left half is the centre strip of one subject's centre-cropped image
/// and whose right half is the other's (subject masks cut and mixed the same way, where any image
/// has one),
/// captioned by `template` with `{left}` and `{right}` replaced by the subjects' phrases (e.g.
/// "a photo of a {left} on the left and a {right} on the right").
pub fn cut_mix(
    a: &[TrainImage],
    b: &[TrainImage],
    phrases: [&str; 2],
    template: &str,
    resolution: u32,
    limit: usize,
) -> Result<Vec<TrainImage>> {
    if !template.contains("{left}") || !template.contains("{right}") {
        bail!("the cut-mix prompt must name both sides with {{left}} and {{right}} (got \"{template}\")")
    }
    let r = resolution;
    let half = r / 2;
    // Each image centre-cropped to a square at the training size, with its subject mask (all
    // subject where it has none).
    let square = |img: &TrainImage| -> (RgbImage, GrayImage) {
        let sized = img.resized_for(r);
        let (w, h) = sized.rgb.dimensions();
        let (x, y) = ((w - r) / 2, (h - r) / 2);
        let mask = match &sized.mask {
            Some(m) => imageops::crop_imm(m, x, y, r, r).to_image(),
            None => GrayImage::from_pixel(r, r, image::Luma([255])),
        };
        (imageops::crop_imm(&sized.rgb, x, y, r, r).to_image(), mask)
    };
    let sa: Vec<_> = a.iter().map(square).collect();
    let sb: Vec<_> = b.iter().map(square).collect();
    let any_mask = a.iter().chain(b).any(|i| i.mask.is_some());
    // Every (A, B) pair on both sides; past `limit`, an even spread over them, so every image
    // of both subjects takes part.
    let mut combos = vec![];
    for i in 0..sa.len() {
        for j in 0..sb.len() {
            for a_left in [true, false] {
                combos.push((i, j, a_left));
            }
        }
    }
    let take = combos.len().min(limit);
    let mut out = vec![];
    for n in 0..take {
        let (i, j, a_left) = combos[n * combos.len() / take];
        let (left, right, lp, rp, lpath) = if a_left {
            (&sa[i], &sb[j], phrases[0], phrases[1], &a[i].path)
        } else {
            (&sb[j], &sa[i], phrases[1], phrases[0], &b[j].path)
        };
        let img = side_by_side(&left.0, &right.0, r);
        let mask = any_mask.then(|| side_by_side(&left.1, &right.1, r));
        out.push(TrainImage {
            path: lpath.with_extension(format!("cut-mix-{i}-{j}-{a_left}")),
            rgb: img,
            caption: Some(template.replace("{left}", lp).replace("{right}", rp)),
            mask,
            regions: vec![
                SubjectRegion {
                    phrase: lp.to_string(),
                    columns: (0, half),
                },
                SubjectRegion {
                    phrase: rp.to_string(),
                    columns: (half, r),
                },
            ],
        });
    }
    Ok(out)
}

/// The centre strips (half the width) of two `r`² images, side by side.
fn side_by_side<P: Pixel + 'static>(
    left: &ImageBuffer<P, Vec<P::Subpixel>>,
    right: &ImageBuffer<P, Vec<P::Subpixel>>,
    r: u32,
) -> ImageBuffer<P, Vec<P::Subpixel>> {
    let half = r / 2;
    let mut out = ImageBuffer::new(r, r);
    imageops::replace(
        &mut out,
        &imageops::crop_imm(left, r / 4, 0, half, r).to_image(),
        0,
        0,
    );
    imageops::replace(
        &mut out,
        &imageops::crop_imm(right, r / 4, 0, half, r).to_image(),
        half as i64,
        0,
    );
    out
}

impl TrainImage {
    /// This image shrunk once to its training size for `resolution` (shorter side =
    /// `resolution`), with the same filters [`render`] and [`render_mask`] use. Rendering the
    /// result gives exactly what rendering the original gives, since an image already at its
    /// training size is only cropped, but without resampling a full-size photo at every step; and
    /// the originals can be dropped (twenty 12-megapixel photos hold about 700 MB as RGB).
    pub fn resized_for(&self, resolution: u32) -> TrainImage {
        let (w, h) = resized_size(self.rgb.width(), self.rgb.height(), resolution);
        if (w, h) == self.rgb.dimensions() {
            return self.clone();
        }
        TrainImage {
            path: self.path.clone(),
            rgb: imageops::resize(&self.rgb, w, h, RGB_FILTER),
            caption: self.caption.clone(),
            mask: self
                .mask
                .as_ref()
                .map(|m| imageops::resize(m, w, h, MASK_FILTER)),
            regions: self.regions.clone(),
        }
    }
}

/// The result of [`load_image_folder`]: the usable images, sorted by file name, and one warning
/// per file that was skipped (the CLI prints them).
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub images: Vec<TrainImage>,
    pub warnings: Vec<String>,
}

/// Loads the training images of `dir`.
///
/// Every regular file whose content is JPEG, PNG or WebP is a candidate, whatever its extension;
/// hidden files, sub-folders, `*.txt` captions and `*.mask.png` masks are not. Candidates are
/// taken in file-name order so that a seeded run sees the same image indices everywhere. A file
/// that cannot be decoded, is in another format, or whose shorter side is below `min_side` is
/// skipped with a warning naming it. It is an error if the folder is missing or nothing usable
/// remains.
pub fn load_image_folder(dir: &Path, min_side: u32) -> Result<ImageFolder> {
    if !dir.exists() {
        bail!("{}: training image folder does not exist", dir.display())
    }
    if !dir.is_dir() {
        bail!(
            "{}: expected a folder of training images, found a file",
            dir.display()
        )
    }
    let mut candidates = Vec::new();
    for entry in std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list training image folder", dir.display()))?
    {
        let entry = entry
            .with_context(|| format!("{}: cannot list training image folder", dir.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_lowercase();
        // `is_file` follows symbolic links, so linked images are used too.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if name.ends_with(".txt") || name.ends_with(MASK_SUFFIX) {
            continue;
        }
        candidates.push(path);
    }
    candidates.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

    let mut images = Vec::new();
    let mut warnings = Vec::new();
    for path in candidates {
        match load_train_image(&path) {
            Ok(image) => {
                let (w, h) = image.rgb.dimensions();
                if w.min(h) < min_side {
                    warnings.push(format!(
                        "{}: {w}×{h} is smaller than the minimum side of {min_side} px; skipped",
                        path.display()
                    ));
                } else {
                    images.push(image);
                }
            }
            Err(e) => warnings.push(format!("{e:#}; skipped")),
        }
    }
    if images.is_empty() {
        let mut msg = format!(
            "{}: no usable training image (JPEG, PNG or WebP, shorter side at least {min_side} px)",
            dir.display()
        );
        for w in &warnings {
            msg.push_str("\n  ");
            msg.push_str(w);
        }
        bail!(msg)
    }
    Ok(ImageFolder { images, warnings })
}

/// Loads one image with its caption and mask (errors name the offending file).
pub fn load_train_image(path: &Path) -> Result<TrainImage> {
    let rgb = imprint_pipeline::image_io::flatten_alpha(read_oriented(path)?);

    let caption_path = path.with_extension("txt");
    let caption = if caption_path.is_file() {
        let text = std::fs::read_to_string(&caption_path)
            .with_context(|| format!("{}: cannot read caption", caption_path.display()))?;
        Some(text.trim().to_string()).filter(|c| !c.is_empty())
    } else {
        None
    };

    let mut mask_name = path.file_stem().unwrap_or_default().to_os_string();
    mask_name.push(MASK_SUFFIX);
    let mask_path = path.with_file_name(mask_name);
    let mask = if mask_path.is_file() {
        let mask = mask_luminance(read_oriented(&mask_path)?);
        if mask.dimensions() != rgb.dimensions() {
            bail!(
                "{}: mask is {}×{} but its image {} is {}×{}",
                mask_path.display(),
                mask.width(),
                mask.height(),
                path.display(),
                rgb.width(),
                rgb.height()
            )
        }
        Some(mask)
    } else {
        None
    };
    Ok(TrainImage {
        path: path.to_path_buf(),
        rgb,
        caption,
        mask,
        regions: vec![],
    })
}

/// Decodes a JPEG, PNG or WebP file (format by content) and applies its EXIF orientation, so the
/// pixels are the way a photo viewer shows them: phones store portrait shots as rotated landscape
/// pixels plus an orientation tag.
fn read_oriented(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .with_context(|| format!("{}: cannot open image", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read image", path.display()))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => bail!(
            "{}: {other:?} images are not supported (JPEG, PNG or WebP)",
            path.display()
        ),
        None => bail!("{}: not a JPEG, PNG or WebP image", path.display()),
    }
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    // A damaged EXIF block should not cost the image: fall back to the pixels as stored.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// A mask's luminance, with transparent pixels as background (alpha composited onto black).
fn mask_luminance(img: DynamicImage) -> GrayImage {
    if !img.color().has_alpha() {
        return img.to_luma8();
    }
    let la = img.to_luma_alpha8();
    GrayImage::from_fn(la.width(), la.height(), |x, y| {
        let [l, a] = la.get_pixel(x, y).0;
        image::Luma([((l as u32 * a as u32 + 127) / 255) as u8])
    })
}

/// Where the training square is cut from the resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Crop {
    /// The middle (torchvision `CenterCrop`); every step sees the same framing.
    #[default]
    Center,
    /// Uniform over all valid offsets (torchvision `RandomCrop`).
    Random,
}

impl FromStr for Crop {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "center" => Ok(Self::Center),
            "random" => Ok(Self::Random),
            other => bail!("unknown crop {other:?}: expected \"center\" or \"random\""),
        }
    }
}

impl fmt::Display for Crop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Center => "center",
            Self::Random => "random",
        })
    }
}

/// The augmentation of diffusers' DreamBooth/LoRA scripts: `Resize(resolution)` (shorter side,
/// aspect kept), a `resolution²` crop, and an optional horizontal flip with p = 0.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Side of the square training image in pixels (a multiple of the VAE's downsampling factor).
    pub resolution: u32,
    pub crop: Crop,
    /// Random horizontal flip with p = 0.5 (diffusers' TI script: `flip_p=0.5`, always on).
    pub flip: bool,
}

/// One augmented view of one image: which image, where the crop sits in the resized image, and
/// whether it is mirrored. Small and hashable, so it can key the [`LatentCache`] and be stored in
/// checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Variant {
    /// Index into the image list the variant was drawn for.
    pub image: usize,
    /// Left edge of the crop, in pixels of the resized image.
    pub crop_x: u32,
    /// Top edge of the crop, in pixels of the resized image.
    pub crop_y: u32,
    pub flip: bool,
    /// Custom Diffusion's resize augmentation ([`Zoom`]), drawn on top of the crop and flip.
    pub zoom: Option<Zoom>,
}

/// A random inpainting mask `R × R` (1 = repaint), as diffusers' DreamBooth-inpaint script draws
/// them (`random_mask`): a size up to the whole side in each direction, a center that keeps half
/// of it inside, and a rectangle or an ellipse with equal odds.
pub fn random_inpainting_mask(resolution: u32, rng: &mut impl Rng) -> Vec<f32> {
    let r = resolution as i64;
    let (sw, sh) = (rng.gen_range(0..=r), rng.gen_range(0..=r));
    let (cx, cy) = (
        rng.gen_range(sw / 2..=r - sw / 2),
        rng.gen_range(sh / 2..=r - sh / 2),
    );
    let ellipse = rng.gen_bool(0.5);
    let (x0, y0, x1, y1) = (cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2);
    let mut out = vec![0f32; (r * r) as usize];
    for y in 0..r {
        for x in 0..r {
            let inside = if ellipse {
                // PIL draws the ellipse inscribed in the box [x0, x1] × [y0, y1].
                let (a, b) = ((x1 - x0) as f64 / 2.0, (y1 - y0) as f64 / 2.0);
                let (mx, my) = ((x0 + x1) as f64 / 2.0, (y0 + y1) as f64 / 2.0);
                a > 0.0
                    && b > 0.0
                    && ((x as f64 - mx) / a).powi(2) + ((y as f64 - my) / b).powi(2) <= 1.0
            } else {
                (x0..=x1).contains(&x) && (y0..=y1).contains(&y)
            };
            if inside {
                out[(y * r + x) as usize] = 1.0;
            }
        }
    }
    out
}

/// Custom Diffusion's resize augmentation (Kumari et al. 2023; diffusers'
/// `train_custom_diffusion.py`, `preprocess`): the (cropped, flipped) view is resized to
/// `scale × scale`; a smaller one is pasted at (`left`, `top`) on a zero (mid-gray) canvas and the
/// loss is restricted to where it lies, a larger one is cropped at (`left`, `top`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Zoom {
    pub scale: u32,
    pub left: u32,
    pub top: u32,
}

impl Zoom {
    /// Draws a zoom as the script does: with p = 0.66 a side in `[R/3, R]`, else in
    /// `[1.2 R, 1.4 R)`; then an offset that keeps the view (or the crop) inside.
    pub fn sample(resolution: u32, rng: &mut impl Rng) -> Zoom {
        let r = resolution;
        let scale = if rng.gen_bool(0.66) {
            rng.gen_range(r / 3..=r)
        } else {
            let (lo, hi) = ((1.2 * r as f64) as u32, (1.4 * r as f64) as u32);
            rng.gen_range(lo..hi.max(lo + 1))
        };
        let room = scale.abs_diff(r);
        Zoom {
            scale,
            left: rng.gen_range(0..=room),
            top: rng.gen_range(0..=room),
        }
    }

    /// The words the script puts before the caption: "a far away " / "very small " for a view
    /// under 0.6 R, "zoomed in " / "close up " for one over R, else nothing.
    pub fn caption_prefix(&self, resolution: u32, rng: &mut impl Rng) -> &'static str {
        if (self.scale as f64) < 0.6 * resolution as f64 {
            ["a far away ", "very small "][rng.gen_range(0..2)]
        } else if self.scale > resolution {
            ["zoomed in ", "close up "][rng.gen_range(0..2)]
        } else {
            ""
        }
    }

    /// The loss mask on the latent grid `[1, R/f, R/f]`: ones where the pasted view lies, shrunk
    /// by one latent cell on each side (the script's `mask[top//f+1 : (top+scale)//f-1, …]`);
    /// all ones for a crop.
    pub fn mask(&self, resolution: u32, f: u32) -> candle_core::Result<Tensor> {
        let g = (resolution / f) as usize;
        let mut cells = vec![0f32; g * g];
        if self.scale > resolution {
            cells.iter_mut().for_each(|c| *c = 1.0);
        } else {
            let (y0, y1) = (
                (self.top / f + 1) as usize,
                ((self.top + self.scale) / f) as usize,
            );
            let (x0, x1) = (
                (self.left / f + 1) as usize,
                ((self.left + self.scale) / f) as usize,
            );
            for y in y0..y1.saturating_sub(1).min(g) {
                for x in x0..x1.saturating_sub(1).min(g) {
                    cells[y * g + x] = 1.0;
                }
            }
        }
        Tensor::from_vec(cells, (1, g, g), &Device::Cpu)
    }
}

/// The size an image of `width × height` takes after its shorter side is resized to `resolution`,
/// as torchvision's `Resize(int)`: the longer side is `int(resolution · long / short)` (truncated).
pub fn resized_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let long = |l: u32, s: u32| (resolution as u64 * l as u64 / s.max(1) as u64) as u32;
    if width <= height {
        (resolution, long(height, width))
    } else {
        (long(width, height), resolution)
    }
}

impl Augment {
    /// Draws a variant of `images[index]`. The random number generator is consumed in a fixed
    /// order (crop x, crop y, flip; only what the settings use), so a seeded generator yields the
    /// same variants on every run. Panics if `index` is out of range.
    pub fn sample_variant(
        &self,
        images: &[TrainImage],
        index: usize,
        rng: &mut impl Rng,
    ) -> Variant {
        let (max_x, max_y) = self.crop_range(&images[index]);
        let (crop_x, crop_y) = match self.crop {
            // Floor of the half margin, as the TI script's `(w - crop) // 2` slice.
            Crop::Center => (max_x / 2, max_y / 2),
            Crop::Random => (rng.gen_range(0..=max_x), rng.gen_range(0..=max_y)),
        };
        let flip = self.flip && rng.gen_bool(0.5);
        Variant {
            image: index,
            crop_x,
            crop_y,
            flip,
            zoom: None,
        }
    }

    /// Every variant a center crop can produce: one per image, two with flipping. This is the
    /// whole set a [`LatentCache`] needs for center-cropped training, so it can be filled up front.
    pub fn center_variants(&self, images: &[TrainImage]) -> Vec<Variant> {
        let center = Augment {
            crop: Crop::Center,
            ..*self
        };
        let mut out = Vec::with_capacity(images.len() * (1 + self.flip as usize));
        for (image, img) in images.iter().enumerate() {
            let (max_x, max_y) = center.crop_range(img);
            for flip in [false, true].into_iter().take(1 + self.flip as usize) {
                out.push(Variant {
                    image,
                    crop_x: max_x / 2,
                    crop_y: max_y / 2,
                    flip,
                    zoom: None,
                });
            }
        }
        out
    }

    /// The largest valid crop offsets of an image (the crop's range is `0..=max`).
    fn crop_range(&self, image: &TrainImage) -> (u32, u32) {
        let (w, h) = resized_size(image.rgb.width(), image.rgb.height(), self.resolution);
        (w - self.resolution, h - self.resolution)
    }
}

/// Renders a variant as the VAE's input: `[3, R, R]` f32 on the CPU, `pixel / 127.5 − 1` in
/// [−1, 1] as diffusers' scripts normalize. Resizing is bicubic (Catmull–Rom, the kernel of PIL's
/// and torchvision's bicubic, widened when downscaling as they antialias). Call
/// [`TrainImage::resized_for`] once beforehand so that this is only a crop.
pub fn render(image: &TrainImage, v: &Variant, resolution: u32) -> candle_core::Result<Tensor> {
    let view = augmented(&image.rgb, v, resolution, RGB_FILTER)?;
    let r = resolution as usize;
    let normalize = |p: u8| p as f32 / 127.5 - 1.0;
    let data: Vec<f32> = match v.zoom {
        None => view.into_raw().into_iter().map(normalize).collect(),
        Some(z) => {
            let scaled = imageops::resize(&view, z.scale, z.scale, RGB_FILTER);
            if z.scale > resolution {
                imageops::crop_imm(&scaled, z.left, z.top, resolution, resolution)
                    .to_image()
                    .into_raw()
                    .into_iter()
                    .map(normalize)
                    .collect()
            } else {
                // A zero canvas in [-1, 1] (mid-gray), the view pasted at (left, top).
                let mut canvas = vec![0f32; r * r * 3];
                for (x, y, p) in scaled.enumerate_pixels() {
                    let at = ((y + z.top) as usize * r + (x + z.left) as usize) * 3;
                    for c in 0..3 {
                        canvas[at + c] = normalize(p.0[c]);
                    }
                }
                canvas
            }
        }
    };
    Tensor::from_vec(data, (r, r, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()
}

/// Renders a variant's mask on the latent grid: `[1, R/f, R/f]` f32 in [0, 1] on the CPU, where
/// `f` is the VAE's downsampling factor (8 for Stable Diffusion: `2^(len(block_out_channels)−1)`).
/// `None` if the image has no mask.
///
/// The mask goes through the same resize, crop and flip as the pixels (resized bilinearly: a
/// bicubic kernel would ring around the subject's edge), then is downsampled by **area**: each
/// latent cell holds the fraction of its `f × f` pixels that are subject. A cell on the edge
/// therefore weighs the loss partially, rather than flipping on or off as nearest sampling would.
pub fn render_mask(
    image: &TrainImage,
    v: &Variant,
    resolution: u32,
    vae_scale_factor: u32,
) -> candle_core::Result<Option<Tensor>> {
    let Some(mask) = &image.mask else {
        return Ok(None);
    };
    let f = vae_scale_factor.max(1);
    if !resolution.is_multiple_of(f) {
        candle_core::bail!(
            "resolution {resolution} is not a multiple of the VAE's downsampling factor {f}"
        )
    }
    let view = augmented(mask, v, resolution, MASK_FILTER)?;
    let g = (resolution / f) as usize;
    let mut cells = vec![0f32; g * g];
    for (x, y, p) in view.enumerate_pixels() {
        cells[(y / f) as usize * g + (x / f) as usize] += p.0[0] as f32;
    }
    let norm = 1.0 / (255.0 * (f * f) as f32);
    cells.iter_mut().for_each(|c| *c *= norm);
    Tensor::from_vec(cells, (1, g, g), &Device::Cpu).map(Some)
}

/// Resize (shorter side to `resolution`), crop at the variant's offsets, flip if asked.
fn augmented<P>(
    img: &ImageBuffer<P, Vec<u8>>,
    v: &Variant,
    resolution: u32,
    filter: FilterType,
) -> candle_core::Result<ImageBuffer<P, Vec<u8>>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = resized_size(img.width(), img.height(), resolution);
    if v.crop_x as u64 + resolution as u64 > w as u64
        || v.crop_y as u64 + resolution as u64 > h as u64
    {
        candle_core::bail!(
            "variant crop at ({}, {}) of {resolution}² falls outside the {w}×{h} resized image \
             (was the variant drawn for another image or resolution?)",
            v.crop_x,
            v.crop_y
        )
    }
    // An image already at the target size is used as is: resampling it would only blur it.
    let resized;
    let source = if (w, h) == img.dimensions() {
        img
    } else {
        resized = imageops::resize(img, w, h, filter);
        &resized
    };
    let mut out = imageops::crop_imm(source, v.crop_x, v.crop_y, resolution, resolution).to_image();
    if v.flip {
        imageops::flip_horizontal_in_place(&mut out);
    }
    Ok(out)
}

/// VAE latent distributions per [`Variant`], kept on the CPU in f32.
///
/// The VAE is frozen in every method here, so a variant's latent distribution never changes: it
/// is computed once and reused, while each step still samples it afresh. One entry holds mean and
/// log-variance, `2 × 4 × (R/8)² × 4` bytes: 128 KiB at 512 px, 32 KiB at 256 px. With center
/// crops there are at most two entries per image (see [`Augment::center_variants`]), a few MB in
/// all. Random crops have up to `2 × (long − short + 1)` variants per image after resizing, and
/// most are seen rarely; bound the cache with [`LatentCache::with_max_entries`] there (the oldest
/// entry is evicted first).
///
/// One cache serves one image list at one resolution: a [`Variant`] records neither.
#[derive(Default)]
pub struct LatentCache {
    entries: HashMap<Variant, LatentDistribution>,
    /// Insertion order, for evicting the oldest entry when bounded.
    order: VecDeque<Variant>,
    max_entries: Option<usize>,
    encodes: usize,
}

impl LatentCache {
    /// An unbounded cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache holding at most `max_entries` variants (at least one).
    pub fn with_max_entries(max_entries: usize) -> Self {
        Self {
            max_entries: Some(max_entries.max(1)),
            ..Self::default()
        }
    }

    /// The cached distribution of `v`, calling `encode` (the VAE on the rendered variant) only if
    /// it is not cached yet. The result is moved to the CPU as f32 before it is stored.
    pub fn get_or_encode(
        &mut self,
        v: &Variant,
        encode: impl FnOnce() -> Result<LatentDistribution>,
    ) -> Result<&LatentDistribution> {
        if !self.entries.contains_key(v) {
            let dist = to_host(encode()?)?;
            self.encodes += 1;
            if let Some(max) = self.max_entries {
                while self.entries.len() >= max {
                    let Some(oldest) = self.order.pop_front() else {
                        break;
                    };
                    self.entries.remove(&oldest);
                }
            }
            self.entries.insert(*v, dist);
            self.order.push_back(*v);
        }
        Ok(&self.entries[v])
    }

    /// Encodes every variant of `variants` not cached yet (for example
    /// [`Augment::center_variants`]), so that training steps never wait on the VAE.
    pub fn prefill(
        &mut self,
        variants: &[Variant],
        mut encode: impl FnMut(&Variant) -> Result<LatentDistribution>,
    ) -> Result<()> {
        for v in variants {
            self.get_or_encode(v, || encode(v))?;
        }
        Ok(())
    }

    /// The cached distribution of `v`, if any.
    pub fn get(&self, v: &Variant) -> Option<&LatentDistribution> {
        self.entries.get(v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many times the cache has called its encoder (entries evicted and encoded again count
    /// twice).
    pub fn encodes(&self) -> usize {
        self.encodes
    }

    /// Bytes held by the cached tensors.
    pub fn bytes(&self) -> usize {
        self.entries
            .values()
            .map(|d| (d.mean.elem_count() + d.logvar.elem_count()) * DType::F32.size_in_bytes())
            .sum()
    }
}

fn to_host(d: LatentDistribution) -> candle_core::Result<LatentDistribution> {
    let host = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    Ok(LatentDistribution {
        mean: host(&d.mean)?,
        logvar: host(&d.logvar)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn cut_mix_puts_each_subject_on_its_named_side() -> Result<()> {
        let solid = |c: [u8; 3], name: &str| TrainImage {
            path: PathBuf::from(name),
            rgb: RgbImage::from_pixel(48, 32, Rgb(c)),
            caption: None,
            mask: None,
            regions: vec![],
        };
        let a = [solid([255, 0, 0], "a.png")];
        let b = [solid([0, 0, 255], "b1.png"), solid([0, 255, 0], "b2.png")];
        let mixed = cut_mix(&a, &b, ["sks dog", "zwx cat"], DEFAULT_PROMPT, 32, 100)?;
        assert_eq!(mixed.len(), 4);
        let first = &mixed[0];
        assert_eq!(first.rgb.dimensions(), (32, 32));
        assert_eq!(first.rgb.get_pixel(3, 5).0, [255, 0, 0]);
        assert_eq!(first.rgb.get_pixel(20, 5).0, [0, 0, 255]);
        assert_eq!(
            first.caption.as_deref(),
            Some("a photo of a sks dog on the left and a zwx cat on the right")
        );
        assert_eq!(first.regions[0].columns, (0, 16));
        assert_eq!(first.regions[1].phrase, "zwx cat");
        let swapped = &mixed[1];
        assert_eq!(swapped.rgb.get_pixel(3, 5).0, [0, 0, 255]);
        assert_eq!(swapped.regions[0].phrase, "zwx cat");
        assert!(first.mask.is_none(), "no image has a mask");
        let limited = cut_mix(&a, &b, ["x", "y"], DEFAULT_PROMPT, 32, 2)?;
        assert_eq!(limited.len(), 2);
        // Spread over the pairs: both second-subject images take part.
        assert_eq!(limited[1].rgb.get_pixel(20, 5).0, [0, 255, 0]);
        let mut masked = a.clone();
        masked[0].mask = Some(GrayImage::new(48, 32));
        let with_mask = cut_mix(&masked, &b, ["x", "y"], DEFAULT_PROMPT, 32, 100)?;
        let m = with_mask[0].mask.as_ref().expect("masks are cut and mixed");
        assert_eq!((m.get_pixel(3, 5).0[0], m.get_pixel(20, 5).0[0]), (0, 255));
        assert!(cut_mix(&a, &b, ["x", "y"], "a {left} only", 32, 3).is_err());
        Ok(())
    }

    const DEFAULT_PROMPT: &str = crate::config::DEFAULT_CUT_MIX_PROMPT;

    /// A minimal big-endian TIFF header with one IFD entry: Orientation (0x0112), SHORT, 1 value.
    fn exif_orientation(value: u16) -> Vec<u8> {
        let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
        t.extend_from_slice(&1u16.to_be_bytes());
        t.extend_from_slice(&0x0112u16.to_be_bytes());
        t.extend_from_slice(&3u16.to_be_bytes());
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&value.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // value padding, next IFD = 0
        t
    }

    /// Left half red, right half blue.
    fn halves(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    fn train_image(rgb: RgbImage) -> TrainImage {
        TrainImage {
            path: PathBuf::from("test.png"),
            rgb,
            caption: None,
            mask: None,
            regions: vec![],
        }
    }

    #[test]
    fn exif_orientation_is_applied() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // Orientation 6: stored landscape, shown rotated 90° clockwise, so the red left half ends
        // up on top.
        let img = halves(32, 16);
        let mut jpeg = Vec::new();
        let mut enc = JpegEncoder::new_with_quality(&mut jpeg, 95);
        enc.set_exif_metadata(exif_orientation(6))?;
        enc.write_image(img.as_raw(), 32, 16, ExtendedColorType::Rgb8)?;
        std::fs::write(dir.path().join("photo.JPG"), &jpeg)?;
        // The same through a PNG eXIf chunk (lossless, so pixels can be compared exactly), with
        // orientation 3 (180°).
        let mut png = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut png);
        enc.set_exif_metadata(exif_orientation(3))?;
        enc.write_image(img.as_raw(), 32, 16, ExtendedColorType::Rgb8)?;
        std::fs::write(dir.path().join("turned.png"), &png)?;

        let folder = load_image_folder(dir.path(), 8)?;
        assert!(folder.warnings.is_empty(), "{:?}", folder.warnings);
        let jpg = &folder.images[0].rgb;
        assert_eq!(jpg.dimensions(), (16, 32));
        let (top, bottom) = (jpg.get_pixel(8, 4).0, jpg.get_pixel(8, 28).0);
        assert!(top[0] > 200 && top[2] < 60, "{top:?}");
        assert!(bottom[2] > 200 && bottom[0] < 60, "{bottom:?}");
        let png = &folder.images[1].rgb;
        assert_eq!(png, &imageops::rotate180(&img));
        Ok(())
    }

    #[test]
    fn alpha_is_flattened_onto_white() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let img = RgbaImage::from_fn(8, 8, |x, _| match x {
            0..=3 => Rgba([0, 0, 0, 0]),
            _ => Rgba([0, 0, 0, 128]),
        });
        img.save(dir.path().join("a.png"))?;
        let folder = load_image_folder(dir.path(), 1)?;
        let rgb = &folder.images[0].rgb;
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(7, 0).0, [127, 127, 127]);
        Ok(())
    }

    #[test]
    fn unusable_files_are_skipped_with_a_warning() -> Result<()> {
        let dir = tempfile::tempdir()?;
        halves(64, 48).save(dir.path().join("good.png"))?;
        halves(16, 16).save(dir.path().join("tiny.png"))?;
        std::fs::write(
            dir.path().join("broken.jpg"),
            b"\xFF\xD8\xFF\xE0 not really a jpeg",
        )?;
        std::fs::write(dir.path().join("notes.md"), b"# my cat")?;
        std::fs::write(dir.path().join(".DS_Store"), b"junk")?;
        let folder = load_image_folder(dir.path(), 32)?;
        assert_eq!(folder.images.len(), 1);
        assert!(folder.images[0].path.ends_with("good.png"));
        let w = &folder.warnings;
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("broken.jpg"), "{w:?}");
        assert!(
            w[1].contains("notes.md") && w[1].contains("not a JPEG"),
            "{w:?}"
        );
        assert!(w[2].contains("tiny.png") && w[2].contains("16×16"), "{w:?}");
        Ok(())
    }

    #[test]
    fn folders_without_images_are_errors() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let err = load_image_folder(dir.path(), 1).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()) && err.contains("no usable"));
        std::fs::write(dir.path().join("broken.png"), b"nope")?;
        let err = load_image_folder(dir.path(), 1).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let missing = dir.path().join("missing");
        let err = load_image_folder(&missing, 1).unwrap_err().to_string();
        assert!(
            err.contains("missing") && err.contains("does not exist"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn captions_and_masks_belong_to_their_image() -> Result<()> {
        let dir = tempfile::tempdir()?;
        halves(16, 16).save(dir.path().join("cat.png"))?;
        std::fs::write(dir.path().join("cat.txt"), "  a photo of sks cat \n")?;
        let mask = GrayImage::from_fn(16, 16, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]));
        mask.save(dir.path().join("cat.mask.png"))?;
        halves(16, 16).save(dir.path().join("dog.png"))?;
        std::fs::write(dir.path().join("dog.txt"), " \n")?;
        let folder = load_image_folder(dir.path(), 1)?;
        assert!(folder.warnings.is_empty(), "{:?}", folder.warnings);
        assert_eq!(folder.images.len(), 2);
        let (cat, dog) = (&folder.images[0], &folder.images[1]);
        assert_eq!(cat.caption.as_deref(), Some("a photo of sks cat"));
        assert_eq!(cat.mask.as_ref(), Some(&mask));
        assert_eq!((dog.caption.as_deref(), dog.mask.is_none()), (None, true));

        // A mask of the wrong size skips its image, naming the mask.
        GrayImage::new(4, 4).save(dir.path().join("dog.mask.png"))?;
        let folder = load_image_folder(dir.path(), 1)?;
        assert_eq!(folder.images.len(), 1);
        assert!(
            folder.warnings[0].contains("dog.mask.png"),
            "{:?}",
            folder.warnings
        );
        Ok(())
    }

    #[test]
    fn center_crop_keeps_aspect_and_takes_the_middle() -> candle_core::Result<()> {
        assert_eq!(resized_size(100, 50, 32), (64, 32));
        assert_eq!(resized_size(50, 100, 32), (32, 64));
        assert_eq!(resized_size(640, 480, 512), (682, 512)); // int(512 · 640 / 480) = 682
                                                             // Thirds: red | green | blue; the center square is all green.
        let img = RgbImage::from_fn(48, 16, |x, _| match x / 16 {
            0 => Rgb([255, 0, 0]),
            1 => Rgb([0, 255, 0]),
            _ => Rgb([0, 0, 255]),
        });
        let images = [train_image(img)];
        let augment = Augment {
            resolution: 16,
            crop: Crop::Center,
            flip: false,
        };
        let v = augment.sample_variant(&images, 0, &mut ChaCha8Rng::seed_from_u64(0));
        assert_eq!((v.crop_x, v.crop_y, v.flip), (16, 0, false));
        let t = render(&images[0], &v, 16)?;
        for (channel, want) in [(0, -1.0f32), (1, 1.0), (2, -1.0)] {
            let c = t.get(channel)?;
            assert_eq!(c.min_all()?.to_scalar::<f32>()?, want);
            assert_eq!(c.max_all()?.to_scalar::<f32>()?, want);
        }

        // Downscaled: a 96×32 image at resolution 8 crops x from 8 (floor of (24 − 8) / 2).
        let v = Augment {
            resolution: 8,
            ..augment
        }
        .sample_variant(
            &[train_image(RgbImage::new(96, 32))],
            0,
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        assert_eq!((v.crop_x, v.crop_y), (8, 0));
        Ok(())
    }

    #[test]
    fn render_has_the_right_shape_range_and_flip() -> candle_core::Result<()> {
        let img = RgbImage::from_fn(40, 24, |x, y| Rgb([(x * 6) as u8, (y * 10) as u8, 255]));
        let image = train_image(img);
        let v = Variant {
            image: 0,
            crop_x: 5,
            crop_y: 0,
            flip: false,
            zoom: None,
        };
        let t = render(&image, &v, 16)?;
        assert_eq!(t.dims(), &[3, 16, 16]);
        assert_eq!(t.dtype(), DType::F32);
        assert!(t.min_all()?.to_scalar::<f32>()? >= -1.0);
        assert!(t.max_all()?.to_scalar::<f32>()? <= 1.0);
        // Blue is 255 everywhere: exactly 1 after normalization.
        assert_eq!(t.get(2)?.min_all()?.to_scalar::<f32>()?, 1.0);
        let flipped = render(&image, &Variant { flip: true, ..v }, 16)?;
        assert_eq!(
            flipped
                .flip(&[2])?
                .sub(&t)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        // A crop that does not fit is refused, not clamped.
        assert!(render(&image, &Variant { crop_x: 20, ..v }, 16).is_err());
        Ok(())
    }

    #[test]
    fn masks_follow_the_crop_onto_the_latent_grid() -> candle_core::Result<()> {
        let mut image = train_image(RgbImage::new(32, 16));
        // Subject: the left half of the image.
        image.mask = Some(GrayImage::from_fn(32, 16, |x, _| {
            image::Luma([if x < 16 { 255 } else { 0 }])
        }));
        // Crop x = 8..24: the left 8 columns are subject, the right 8 are not.
        let v = Variant {
            image: 0,
            crop_x: 8,
            crop_y: 0,
            flip: false,
            zoom: None,
        };
        let m = render_mask(&image, &v, 16, 8)?.expect("mask");
        assert_eq!(m.dims(), &[1, 2, 2]);
        assert_eq!(m.flatten_all()?.to_vec1::<f32>()?, [1.0, 0.0, 1.0, 0.0]);
        let m = render_mask(&image, &Variant { flip: true, ..v }, 16, 8)?.expect("mask");
        assert_eq!(m.flatten_all()?.to_vec1::<f32>()?, [0.0, 1.0, 0.0, 1.0]);
        // Area downsampling: a cell half covered is 0.5.
        let v = Variant { crop_x: 4, ..v };
        let m = render_mask(&image, &v, 16, 8)?.expect("mask");
        assert_eq!(m.flatten_all()?.to_vec1::<f32>()?, [1.0, 0.5, 1.0, 0.5]);
        assert!(render_mask(&train_image(RgbImage::new(16, 16)), &v, 16, 8)?.is_none());
        Ok(())
    }

    #[test]
    fn zoomed_views_paste_or_crop_with_their_masks() -> candle_core::Result<()> {
        let image = train_image(RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255])));
        let out = Variant {
            image: 0,
            crop_x: 0,
            crop_y: 0,
            flip: false,
            zoom: Some(Zoom {
                scale: 24,
                left: 8,
                top: 0,
            }),
        };
        let px = render(&image, &out, 32)?; // [3, 32, 32]
        let at = |y: usize, x: usize| -> candle_core::Result<f32> {
            px.get(0)?.get(y)?.get(x)?.to_scalar::<f32>()
        };
        assert_eq!(at(4, 12)?, 1.0); // inside the pasted view: white
        assert_eq!(at(28, 12)?, 0.0); // below it: the zero (mid-gray) canvas
        assert_eq!(at(4, 2)?, 0.0);
        // Latent cells 8/8+1 .. 32/8-1 across, 0/8+1 .. 24/8-1 down: the one cell (1, 2).
        let m = Zoom {
            scale: 24,
            left: 8,
            top: 0,
        }
        .mask(32, 8)?;
        let cells: Vec<f32> = m.flatten_all()?.to_vec1()?;
        assert_eq!(cells.iter().sum::<f32>(), 1.0);
        assert_eq!(cells[4 + 2], 1.0);
        // A view too small to cover a whole inner cell masks nothing, as in the script.
        let tiny = Zoom {
            scale: 16,
            left: 8,
            top: 0,
        }
        .mask(32, 8)?;
        assert_eq!(tiny.sum_all()?.to_scalar::<f32>()?, 0.0);
        let zoomed_in = Zoom {
            scale: 40,
            left: 3,
            top: 5,
        };
        assert_eq!(zoomed_in.mask(32, 8)?.sum_all()?.to_scalar::<f32>()?, 16.0);
        let v = Variant {
            zoom: Some(zoomed_in),
            ..out
        };
        assert_eq!(render(&image, &v, 32)?.dims(), &[3, 32, 32]);
        Ok(())
    }

    #[test]
    fn random_inpainting_masks_are_rectangles_or_ellipses_inside_the_view() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..40 {
            let m = random_inpainting_mask(32, &mut rng);
            assert_eq!(m.len(), 32 * 32);
            assert!(m.iter().all(|v| *v == 0.0 || *v == 1.0));
            let area: f32 = m.iter().sum();
            // A filled rectangle's area is its bounding box's; an ellipse's is about π/4 of it.
            let rows: Vec<usize> = (0..32)
                .filter(|y| m[y * 32..(y + 1) * 32].iter().any(|v| *v > 0.0))
                .collect();
            let cols: Vec<usize> = (0..32)
                .filter(|x| (0..32).any(|y| m[y * 32 + x] > 0.0))
                .collect();
            if area > 16.0 {
                let bbox = (rows.len() * cols.len()) as f32;
                kinds.insert(area == bbox);
            }
        }
        assert_eq!(kinds.len(), 2, "both rectangles and ellipses are drawn");
        let a = random_inpainting_mask(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        let b = random_inpainting_mask(16, &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
    }

    #[test]
    fn pre_resized_images_render_the_same() -> candle_core::Result<()> {
        let mut image = train_image(RgbImage::from_fn(90, 60, |x, y| {
            Rgb([(x * 2) as u8, (y * 4) as u8, ((x * y) % 256) as u8])
        }));
        image.mask = Some(GrayImage::from_fn(90, 60, |x, y| {
            image::Luma([if x + y < 70 { 255 } else { 0 }])
        }));
        let small = image.resized_for(16);
        assert_eq!(small.rgb.dimensions(), (24, 16));
        assert_eq!(small.mask.as_ref().map(|m| m.dimensions()), Some((24, 16)));
        let v = Variant {
            image: 0,
            crop_x: 5,
            crop_y: 0,
            flip: true,
            zoom: None,
        };
        let diff = render(&image, &v, 16)?.sub(&render(&small, &v, 16)?)?;
        assert_eq!(diff.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        let (a, b) = (
            render_mask(&image, &v, 16, 8)?.expect("mask"),
            render_mask(&small, &v, 16, 8)?.expect("mask"),
        );
        assert_eq!(a.sub(&b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn variant_sampling_is_deterministic_for_a_seed() {
        let images = [
            train_image(RgbImage::new(48, 32)),
            train_image(RgbImage::new(32, 80)),
        ];
        let augment = Augment {
            resolution: 32,
            crop: Crop::Random,
            flip: true,
        };
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..64)
                .map(|i| augment.sample_variant(&images, i % 2, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draw(3);
        assert_eq!(a, draw(3));
        assert_ne!(a, draw(4));
        for v in &a {
            let (w, h) = resized_size(
                images[v.image].rgb.width(),
                images[v.image].rgb.height(),
                32,
            );
            assert!(v.crop_x + 32 <= w && v.crop_y + 32 <= h, "{v:?}");
        }
        assert!(a.iter().any(|v| v.flip) && a.iter().any(|v| !v.flip));
        assert!(a.iter().any(|v| v.image == 1 && v.crop_y > 0));
    }

    #[test]
    fn the_cache_encodes_each_variant_once() -> Result<()> {
        let images = [
            train_image(RgbImage::new(16, 16)),
            train_image(RgbImage::new(24, 16)),
        ];
        let augment = Augment {
            resolution: 16,
            crop: Crop::Center,
            flip: true,
        };
        let variants = augment.center_variants(&images);
        assert_eq!(variants.len(), 4);
        assert_eq!((variants[2].crop_x, variants[3].flip), (4, true));
        let fake_vae = |v: &Variant| -> Result<LatentDistribution> {
            let x = render(&images[v.image], v, 16)?;
            let mean = x.narrow(1, 0, 2)?.narrow(2, 0, 2)?.unsqueeze(0)?;
            Ok(LatentDistribution {
                logvar: mean.zeros_like()?,
                mean,
            })
        };
        let mut cache = LatentCache::new();
        let mut calls = 0;
        cache.prefill(&variants, |v| {
            calls += 1;
            fake_vae(v)
        })?;
        assert_eq!((calls, cache.len(), cache.encodes()), (4, 4, 4));
        assert_eq!(cache.bytes(), 4 * 2 * (3 * 2 * 2) * 4);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for step in 0..20 {
            let v = augment.sample_variant(&images, step % 2, &mut rng);
            let d = cache.get_or_encode(&v, || panic!("{v:?} should be cached"))?;
            assert_eq!(d.mean.dims(), &[1, 3, 2, 2]);
        }
        assert_eq!(cache.encodes(), 4);

        // Bounded: the oldest entry makes room.
        let mut small = LatentCache::with_max_entries(2);
        small.prefill(&variants, fake_vae)?;
        assert_eq!((small.len(), small.encodes()), (2, 4));
        assert!(small.get(&variants[0]).is_none() && small.get(&variants[3]).is_some());
        Ok(())
    }
}
