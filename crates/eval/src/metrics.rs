//! CLIP-I, CLIP-T and DINO (Ruiz et al. 2023, DreamBooth, §4.1): fidelity to a subject as the
//! mean cosine similarity between generated and reference images' features (CLIP's projected image
//! features, and the CLS token of a self-supervised ViT, which unlike CLIP separates instances of
//! one class), and prompt fidelity as the mean cosine between generated images and the prompt's
//! CLIP text features.

use crate::clip::ClipModel;
use crate::preprocess::read_image_rgb;
use crate::vit::ViTModel;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use image::RgbImage;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Images are embedded this many at a time.
const BATCH: usize = 16;

/// The metrics of one set of generated images.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Scores {
    pub clip_i: f64,
    pub clip_t: f64,
    pub dino: f64,
}

/// Rows normalized to unit length.
/// Rows scaled to unit length (cosine similarity is then a dot product).
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Mean cosine over all pairs of rows of `a [N, D]` and `b [M, D]`.
pub fn mean_pairwise_cosine(a: &Tensor, b: &Tensor) -> Result<f64> {
    let sims = unit_rows(a)?.matmul(&unit_rows(b)?.t()?)?;
    Ok(sims.mean_all()?.to_scalar::<f32>()? as f64)
}

/// Mean cosine over pairs of distinct rows of `a [N, D]` (N ≥ 2): how alike a set is to itself,
/// the "real images" row of the DreamBooth paper's table.
pub fn mean_cosine_distinct(a: &Tensor) -> Result<Option<f64>> {
    let n = a.dim(0)?;
    if n < 2 {
        return Ok(None);
    }
    let sims: Vec<Vec<f32>> = {
        let u = unit_rows(a)?;
        u.matmul(&u.t()?)?.to_vec2()?
    };
    let mut total = 0.0;
    for (i, row) in sims.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            if i != j {
                total += v as f64;
            }
        }
    }
    Ok(Some(total / (n * (n - 1)) as f64))
}

/// The image files of a folder (png, jpg, jpeg, webp, bmp), sorted by name; a folder without any
/// is refused.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot read folder", dir.display()))?;
    let mut files = Vec::new();
    for e in entries {
        let p = e?.path();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if p.is_file()
            && matches!(
                ext.as_deref(),
                Some("png" | "jpg" | "jpeg" | "webp" | "bmp")
            )
        {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no images (png, jpg, jpeg, webp or bmp) in this folder",
            dir.display()
        )
    }
    Ok(files)
}

/// Reads every image of a folder (RGB as the reference processors convert them).
pub fn read_images(dir: &Path) -> Result<Vec<RgbImage>> {
    image_files(dir)?
        .iter()
        .map(|p| read_image_rgb(p))
        .collect()
}

/// The two feature extractors of the protocol.
pub struct Evaluator {
    pub clip: ClipModel,
    pub dino: ViTModel,
    device: Device,
}

impl Evaluator {
    pub fn new(clip: ClipModel, dino: ViTModel, device: Device) -> Self {
        Self { clip, dino, device }
    }

    pub fn load(clip_dir: &Path, dino_dir: &Path, device: &Device) -> Result<Self> {
        Ok(Self::new(
            ClipModel::load(clip_dir, device)?,
            ViTModel::load(dino_dir, device)?,
            device.clone(),
        ))
    }

    /// CLIP's projected image features `[N, P]`.
    pub fn clip_features(&self, images: &[RgbImage]) -> Result<Tensor> {
        let mut out = Vec::new();
        for chunk in images.chunks(BATCH) {
            let px = self.clip.processor.preprocess_batch(chunk, &self.device)?;
            out.push(self.clip.image_features(&px)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// The ViT's CLS features `[N, D]`.
    pub fn dino_features(&self, images: &[RgbImage]) -> Result<Tensor> {
        let Some(processor) = &self.dino.processor else {
            bail!("the DINO model has no preprocessor_config.json")
        };
        let mut out = Vec::new();
        for chunk in images.chunks(BATCH) {
            let px = processor.preprocess_batch(chunk, &self.device)?;
            out.push(self.dino.cls_features(&px)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// Features of a set of images, computed once and reused across comparisons.
    pub fn features(&self, images: &[RgbImage]) -> Result<ImageFeatures> {
        if images.is_empty() {
            bail!("no images to evaluate")
        }
        Ok(ImageFeatures {
            clip: self.clip_features(images)?,
            dino: self.dino_features(images)?,
        })
    }

    /// All three metrics of `generated` against `references` and `prompt`.
    pub fn score(
        &self,
        generated: &ImageFeatures,
        references: &ImageFeatures,
        prompt: &str,
    ) -> Result<Scores> {
        let text = self.clip.prompt_features(&[prompt])?;
        Ok(Scores {
            clip_i: mean_pairwise_cosine(&generated.clip, &references.clip)?,
            clip_t: mean_pairwise_cosine(&generated.clip, &text)?,
            dino: mean_pairwise_cosine(&generated.dino, &references.dino)?,
        })
    }

    /// `imprint eval`: the metrics of the images in `generated` against those in `references`.
    pub fn score_dirs(&self, generated: &Path, references: &Path, prompt: &str) -> Result<Scores> {
        let g = self.features(&read_images(generated)?)?;
        let r = self.features(&read_images(references)?)?;
        self.score(&g, &r, prompt)
    }
}

/// CLIP and DINO features of one image set.
pub struct ImageFeatures {
    pub clip: Tensor,
    pub dino: Tensor,
}
