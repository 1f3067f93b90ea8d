//! Images in and out: reading init images, tensors ↔ pixels, PNG writing and grids.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, DynamicImage, RgbImage};
use std::path::Path;

/// Reads an image file (PNG, JPEG, WebP), flattening alpha onto white.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open image", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read image", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    Ok(flatten_alpha(img))
}

/// Reads an image prompt as diffusers' `load_image` does: EXIF orientation applied
/// (`ImageOps.exif_transpose`), then `convert("RGB")`, which drops alpha rather than compositing.
pub fn read_image_prompt(path: &Path) -> Result<RgbImage> {
    use image::ImageDecoder;
    let mut decoder = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open image", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read image", path.display()))?
        .into_decoder()
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    let orientation = decoder
        .orientation()
        .with_context(|| format!("{}: unreadable EXIF orientation", path.display()))?;
    let mut img = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("{}: not a readable image", path.display()))?;
    img.apply_orientation(orientation);
    Ok(img.to_rgb8())
}

/// Composites an image with alpha over white (opaque images are only converted to 8-bit RGB).
pub fn flatten_alpha(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as f32 / 255.0;
        let mix = |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

/// Resizes to exactly `width × height` (Lanczos) and returns `[1, 3, H, W]` in [−1, 1].
pub fn rgb_to_tensor(
    img: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    let img = if img.width() as usize != width || img.height() as usize != height {
        image::imageops::resize(img, width as u32, height as u32, FilterType::Lanczos3)
    } else {
        img.clone()
    };
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?)
}

/// `[3, H, W]` (or `[1, 3, H, W]`) in about [−1, 1] → 8-bit RGB, as diffusers' postprocessing:
/// `round(clamp(x / 2 + 0.5, 0, 1) · 255)`.
pub fn tensor_to_rgb(t: &Tensor) -> Result<RgbImage> {
    let t = if t.rank() == 4 {
        t.squeeze(0)?
    } else {
        t.clone()
    };
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        bail!("expected a 3-channel image tensor, got {c} channels")
    }
    let t = ((t.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let data: Vec<f32> = t.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes: Vec<u8> = data
        .into_iter()
        .map(|v| (v * 255.0).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer size mismatch")
}

/// Writes a PNG atomically (temporary name, then rename): a failed write leaves nothing behind.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!(
                "{}: output folder {} does not exist",
                path.display(),
                parent.display()
            )
        }
    }
    imprint_models::io::write_atomic(path, &bytes)
}

/// Lays images out in a near-square grid (all images must share a size).
pub fn grid(images: &[RgbImage]) -> Result<RgbImage> {
    let Some(first) = images.first() else {
        bail!("grid of no images")
    };
    let (w, h) = first.dimensions();
    let cols = (images.len() as f64).sqrt().ceil() as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let mut out = RgbImage::new(cols * w, rows * h);
    for (i, img) in images.iter().enumerate() {
        if img.dimensions() != (w, h) {
            bail!("grid images must share one size")
        }
        let (x, y) = ((i as u32 % cols) * w, (i as u32 / cols) * h);
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region mask's latent weights average each cell's pixels (soft edges stay soft), and a
    /// size off the latent grid is refused.
    #[test]
    fn weight_maps_average_each_latent_cell() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mask.png");
        // 4×2 pixels: the left column white, the next gray (128), the rest black.
        image::GrayImage::from_fn(4, 2, |x, _| image::Luma([[255, 128, 0, 0][x as usize]]))
            .save(&path)?;
        let w: Vec<f32> = read_weight_map(&path, 4, 2, 2, &Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        let want = [(1.0 + 128.0 / 255.0) / 2.0, 0.0];
        assert_eq!(w.len(), 2);
        for (g, e) in w.iter().zip(want) {
            assert!((g - e).abs() < 1e-6, "{w:?}");
        }
        assert!(read_weight_map(&path, 5, 2, 2, &Device::Cpu).is_err());
        assert!(read_weight_map(&path, 4, 2, 0, &Device::Cpu).is_err());
        Ok(())
    }

    /// An RGBA PNG tagged "rotate 90° clockwise" (EXIF orientation 6) reads rotated, with its
    /// alpha dropped, not composited.
    #[test]
    fn image_prompts_follow_exif_orientation_and_drop_alpha() {
        use image::ImageEncoder;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prompt.png");
        // 2×1: a transparent red pixel, then an opaque blue one.
        let pixels: [u8; 8] = [255, 0, 0, 0, 0, 0, 255, 255];
        let mut png = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut png);
        // Big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1, value 6.
        let exif = vec![
            b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0,
            0, 0, 0,
        ];
        enc.set_exif_metadata(exif).unwrap();
        enc.write_image(&pixels, 2, 1, image::ExtendedColorType::Rgba8)
            .unwrap();
        std::fs::write(&path, png).unwrap();
        let img = read_image_prompt(&path).unwrap();
        assert_eq!(img.dimensions(), (1, 2));
        assert_eq!(img.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(0, 1).0, [0, 0, 255]);
        // The composite reader keeps the file's orientation and whitens the transparent pixel.
        assert_eq!(read_rgb(&path).unwrap().get_pixel(0, 0).0, [255, 255, 255]);
    }

    #[test]
    fn pixels_round_trip() -> Result<()> {
        let img = RgbImage::from_fn(4, 3, |x, y| image::Rgb([(x * 60) as u8, (y * 80) as u8, 7]));
        let t = rgb_to_tensor(&img, 4, 3, &Device::Cpu)?;
        assert_eq!(t.dims(), &[1, 3, 3, 4]);
        assert_eq!(tensor_to_rgb(&t)?, img);
        let g = grid(&[img.clone(), img.clone(), img])?;
        assert_eq!(g.dimensions(), (8, 6));
        Ok(())
    }
}

/// A mask image as luminance (PIL's `convert("L")` weights), resized to `width × height`.
fn read_gray(path: &Path, width: usize, height: usize) -> Result<image::GrayImage> {
    let rgb = read_rgb(path).with_context(|| format!("{}: the mask", path.display()))?;
    let gray = image::GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let l = (r as u32 * 299 + g as u32 * 587 + b as u32 * 114 + 500) / 1000;
        image::Luma([l as u8])
    });
    Ok(
        if gray.width() as usize != width || gray.height() as usize != height {
            image::imageops::resize(&gray, width as u32, height as u32, FilterType::Lanczos3)
        } else {
            gray
        },
    )
}

/// A soft mask `[1, 1, height / factor, width / factor]` in [0, 1]: the image's luminance at
/// `width × height`, averaged over each latent pixel's `factor × factor` block (not binarized:
/// gray blends, and a region's edge falls between latent pixels smoothly).
pub fn read_weight_map(
    path: &Path,
    width: usize,
    height: usize,
    factor: usize,
    device: &Device,
) -> Result<Tensor> {
    if factor == 0 || width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
        bail!("{}: a {width}×{height} region mask does not fall on a latent grid of {factor}-pixel cells", path.display())
    }
    let gray = read_gray(path, width, height)?;
    let (h, w) = (height / factor, width / factor);
    let mut out = vec![0f32; h * w];
    for (x, y, p) in gray.enumerate_pixels() {
        let (i, j) = (y as usize / factor, x as usize / factor);
        if i < h && j < w {
            out[i * w + j] += p.0[0] as f32 / 255.0;
        }
    }
    let n = (factor * factor) as f32;
    out.iter_mut().for_each(|v| *v /= n);
    Ok(Tensor::from_vec(out, (1, 1, h, w), device)?)
}

/// An inpainting mask as diffusers' mask processor makes it (`VaeImageProcessor(do_normalize=False,
/// do_binarize=True, do_convert_grayscale=True)`): grayscale (ITU-R 601-2 luma, PIL's "L"),
/// resized to `width × height` (Lanczos), binarized at 0.5 (white = repaint). Returns the pixel
/// mask `[1, 1, H, W]` and its nearest-neighbour downsampling to the latent grid `[1, 1, H/f, W/f]`
/// (`torch.nn.functional.interpolate`'s default mode), both 0/1 f32.
pub fn read_mask(
    path: &Path,
    width: usize,
    height: usize,
    factor: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let gray = read_gray(path, width, height)?;
    let full: Vec<f32> = gray
        .pixels()
        .map(|p| {
            if p.0[0] as f32 / 255.0 >= 0.5 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let (h, w) = (height / factor, width / factor);
    let latent: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| (i, j)))
        .map(|(i, j)| full[(i * factor) * width + j * factor])
        .collect();
    Ok((
        Tensor::from_vec(full, (1, 1, height, width), device)?,
        Tensor::from_vec(latent, (1, 1, h, w), device)?,
    ))
}
