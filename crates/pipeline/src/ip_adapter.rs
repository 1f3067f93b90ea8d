//! IP-Adapter (Ye et al. 2023): image prompts through decoupled cross-attention, loaded from the
//! h94/IP-Adapter layout and run as diffusers' `IPAdapterAttnProcessor` does.
//!
//! An image encoder (`CLIPVisionModelWithProjection`, the `image_encoder/` folder beside the
//! file) embeds the prompt images; `image_proj` turns the embedding into a few tokens — the base
//! variant a Linear to `num_tokens × cross_dim` then a LayerNorm, the "Plus" variant a perceiver
//! Resampler over the encoder's penultimate hidden states — and every cross-attention layer gets
//! its own `to_k_ip` / `to_v_ip` (models' [`ImagePromptAttention`]). The tokens are appended to the
//! text states; each adapted layer splits them off again. Under classifier-free guidance the
//! negative image embedding is zeros (base) or the encoder's states of an all-zero image (Plus).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use imprint_models::attention::ImagePromptAttention;
use imprint_models::clip_vision::ClipVisionModelWithProjection;
use imprint_models::image_processor::{ImageProcessor, Resample, ResizeTo};
use imprint_models::unet::UNet2DConditionModel;
use imprint_ops::{layer_norm, Linear};
use std::path::{Path, PathBuf};

/// Puts an adapter's `(to_k_ip, to_v_ip)` pairs (diffusers' `attn_processors` order) on every
/// cross-attention layer of `unet`, at `scale`.
fn attach_layers(
    path: &Path,
    layers: &[(Linear, Linear)],
    num_tokens: usize,
    unet: &mut UNet2DConditionModel,
    scale: &IpScale,
    base: f64,
) -> Result<()> {
    let blocks = unet.transformer_blocks_in_processor_order_mut();
    if blocks.len() != layers.len() {
        bail!(
            "{}: the adapter has weights for {} cross-attention layers, this UNet has {}",
            path.display(),
            layers.len(),
            blocks.len()
        )
    }
    let paths: Vec<String> = blocks.iter().map(|(p, _)| p.clone()).collect();
    scale.validate(&paths)?;
    let mut plan = vec![];
    for ((block_path, block), (k, v)) in blocks.into_iter().zip(layers) {
        let inner = block.attn2.inner_dim();
        if k.out_dim() != inner || v.out_dim() != inner {
            bail!(
                "{}: ip_adapter weights for {block_path} are {} wide, the layer is {inner}",
                path.display(),
                k.out_dim()
            )
        }
        plan.push((block, scale.for_block(&block_path, base)?, k, v));
    }
    for (block, s, k, v) in plan {
        block.attn2.image_prompt = Some(ImagePromptAttention {
            to_k_ip: k.clone(),
            to_v_ip: v.clone(),
            scale: s,
            num_tokens,
        });
    }
    Ok(())
}

/// The adapter's image encoder folder: `encoder_dir`, else `image_encoder/` beside the file; an
/// error if it has no config.
fn image_encoder_dir(adapter: &Path, encoder_dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match encoder_dir {
        Some(d) => d.to_path_buf(),
        None => adapter
            .parent()
            .unwrap_or(Path::new("."))
            .join("image_encoder"),
    };
    if !dir.join("config.json").is_file() {
        bail!(
            "{}: no image encoder (a CLIPVisionModelWithProjection folder with config.json); pass --image-encoder DIR",
            dir.display()
        )
    }
    Ok(dir)
}

/// An image prompt as the command line gives it: `--ip-adapter FILE[:SCALE] --ip-image IMG…
/// [--image-encoder DIR] [--ip-adapter-blocks JSON]`.
#[derive(Clone, Debug, Default)]
pub struct ImagePromptSpec {
    /// `FILE[:SCALE]` (scale 1 when absent).
    pub adapter: String,
    pub images: Vec<PathBuf>,
    pub image_encoder: Option<PathBuf>,
    /// Per-block scales in InstantStyle's JSON form, each multiplied by SCALE.
    pub blocks: Option<String>,
}

/// A loaded image prompt: the adapter's per-layer projections, their scales and the image
/// tokens, ready to attach to a UNet (the image encoder is not kept: the tokens are made once).
pub struct ImagePrompt {
    path: PathBuf,
    layers: Vec<(Linear, Linear)>,
    scale: IpScale,
    base: f64,
    /// `(negative, positive)`, each `[1, N, cross_dim]`.
    pub tokens: (Tensor, Tensor),
}

/// Splits `FILE[:SCALE]`; a suffix that is not a number belongs to the path.
pub fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f64)> {
    let (path, scale) = match spec.rsplit_once(':') {
        Some((p, s)) if s.parse::<f64>().is_ok() => (PathBuf::from(p), s.parse::<f64>()?),
        _ => (PathBuf::from(spec), 1.0),
    };
    if !scale.is_finite() {
        bail!("--ip-adapter: scale {scale} is not a finite number")
    }
    Ok((path, scale))
}

impl ImagePromptSpec {
    /// The checks that need no model: the adapter file exists, every image decodes, the image
    /// encoder folder has a config (training runs them before any setup).
    pub fn check(&self) -> Result<()> {
        let (path, _) = parse_adapter_spec(&self.adapter)?;
        if !path.is_file() {
            bail!("{}: IP-Adapter file not found", path.display())
        }
        if self.images.is_empty() {
            bail!("--ip-adapter needs at least one --ip-image IMG (the image prompt)")
        }
        for p in &self.images {
            crate::image_io::read_image_prompt(p)?;
        }
        image_encoder_dir(&path, self.image_encoder.as_deref())?;
        Ok(())
    }

    /// Checks every input (adapter file, images, per-block JSON), then loads the adapter and its
    /// image encoder and embeds the images.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<ImagePrompt> {
        let (path, base) = parse_adapter_spec(&self.adapter)?;
        if !path.is_file() {
            bail!("{}: IP-Adapter file not found", path.display())
        }
        if self.images.is_empty() {
            bail!("--ip-adapter needs at least one --ip-image IMG (the image prompt)")
        }
        let images = self
            .images
            .iter()
            .map(|p| crate::image_io::read_image_prompt(p))
            .collect::<Result<Vec<_>>>()?;
        let scale = match &self.blocks {
            Some(json) => {
                let v: serde_json::Value = serde_json::from_str(json)
                    .with_context(|| format!("--ip-adapter-blocks: not JSON: {json}"))?;
                if !v.is_object() {
                    bail!("--ip-adapter-blocks: expected an object like {{\"up\": {{\"block_0\": [0.0, 1.0, 0.0]}}}}")
                }
                IpScale::PerBlock(v)
            }
            None => IpScale::All(base),
        };
        let adapter = IpAdapter::load(&path, self.image_encoder.as_deref(), dtype, device)?;
        let tokens = adapter.tokens(&images)?;
        Ok(ImagePrompt {
            path: adapter.path.clone(),
            layers: adapter.layers.clone(),
            scale,
            base,
            tokens,
        })
    }
}

impl ImagePrompt {
    /// Gives every cross-attention layer of `unet` the adapter's image branch at its scale.
    pub fn attach(&self, unet: &mut UNet2DConditionModel) -> Result<()> {
        let num_tokens = self.tokens.0.dim(1)?;
        attach_layers(
            &self.path,
            &self.layers,
            num_tokens,
            unet,
            &self.scale,
            self.base,
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `image_proj` of an IP-Adapter.
pub enum ImageProjection {
    /// diffusers' `ImageProjection`: `LayerNorm(reshape(proj(image_embeds), [N, D]))`.
    Base {
        proj: Linear,
        norm: (Tensor, Tensor),
        num_tokens: usize,
        cross_dim: usize,
    },
    /// diffusers' `IPAdapterPlusImageProjection` (h94's `Resampler`).
    Plus(Resampler),
}

/// The perceiver Resampler of IP-Adapter Plus: learned latent queries attend to the projected
/// encoder states (and to themselves), each layer followed by a GELU feed-forward, both residual.
pub struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    proj_out: Linear,
    norm_out: (Tensor, Tensor),
    layers: Vec<ResamplerLayer>,
    heads: usize,
    dim_head: usize,
}

struct ResamplerLayer {
    norm1: (Tensor, Tensor),
    norm2: (Tensor, Tensor),
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: (Tensor, Tensor),
    ff_in: Linear,
    ff_out: Linear,
}

fn ln(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
    Ok(layer_norm(x, w, b, 1e-5)?)
}

impl Resampler {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (_, n, dim) = self.latents.dims3()?;
        let mut latents = self.latents.broadcast_as((b, n, dim))?.contiguous()?;
        let x = self.proj_in.forward(x)?;
        let (h, dh) = (self.heads, self.dim_head);
        let heads = |t: Tensor| -> Result<Tensor> {
            let (b, l, _) = t.dims3()?;
            Ok(t.reshape((b, l, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        for layer in &self.layers {
            // PerceiverAttention: q from the latents, k/v from [x; latents], both scaled by
            // dh^(-1/4) before the product (h94's `attention` in resampler.py).
            let xn = ln(&x, &layer.norm1)?;
            let ln_ = ln(&latents, &layer.norm2)?;
            let q = layer.to_q.forward(&ln_)?;
            let kv = layer.to_kv.forward(&Tensor::cat(&[&xn, &ln_], 1)?)?;
            let inner = h * dh;
            let k = kv.narrow(D::Minus1, 0, inner)?;
            let v = kv.narrow(D::Minus1, inner, inner)?;
            let s = 1.0 / (dh as f64).sqrt().sqrt();
            let (q, k, v) = (heads((q * s)?)?, heads((k * s)?)?, heads(v)?);
            let w = imprint_ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, inner))?;
            latents = (layer.to_out.forward(&o)? + latents)?;
            let f = layer.ff_out.forward(
                &layer
                    .ff_in
                    .forward(&ln(&latents, &layer.ff_norm)?)?
                    .gelu_erf()?,
            )?;
            latents = (f + latents)?;
        }
        ln(&self.proj_out.forward(&latents)?, &self.norm_out)
    }
}

impl ImageProjection {
    /// Image tokens `[B, N, cross_dim]` from the encoder's output for this variant.
    pub fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        match self {
            ImageProjection::Base {
                proj,
                norm,
                num_tokens,
                cross_dim,
            } => {
                let b = embeds.dim(0)?;
                ln(
                    &proj
                        .forward(embeds)?
                        .reshape((b, *num_tokens, *cross_dim))?,
                    norm,
                )
            }
            ImageProjection::Plus(r) => r.forward(embeds),
        }
    }

    pub fn is_plus(&self) -> bool {
        matches!(self, ImageProjection::Plus(_))
    }

    pub fn num_tokens(&self) -> usize {
        match self {
            ImageProjection::Base { num_tokens, .. } => *num_tokens,
            ImageProjection::Plus(r) => r.latents.dim(1).unwrap_or(0),
        }
    }
}

/// Scales per layer: one number for every layer, or InstantStyle's per-block form
/// (`{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}`), where a
/// block's value is one number or one per attention of the block and every layer not named gets 0.
#[derive(Clone, Debug)]
pub enum IpScale {
    All(f64),
    PerBlock(serde_json::Value),
}

impl IpScale {
    /// The scale of the transformer block at `path` (e.g. `up_blocks.1.attentions.0.transformer_blocks.0`),
    /// expanded as diffusers' `_maybe_expand_lora_scales` does: a number for a direction
    /// (`"up": 0.5`) or a block (`"block_1": 0.5`) covers all its attentions, a one-element list
    /// is broadcast, `"mid"` takes a number or a one-element list; unnamed layers get 0.
    pub fn for_block(&self, path: &str, base: f64) -> Result<f64> {
        let v = match self {
            IpScale::All(s) => return Ok(*s),
            IpScale::PerBlock(v) => v,
        };
        let number = |x: &serde_json::Value, what: &str| -> Result<f64> {
            x.as_f64().with_context(|| {
                format!("per-block IP-Adapter scale for {what}: {x} is not a number")
            })
        };
        let pick = |x: &serde_json::Value, i: usize, what: &str| -> Result<f64> {
            if x.is_number() {
                return number(x, what);
            }
            let list = x.as_array().with_context(|| {
                format!("per-block IP-Adapter scale for {what}: expected a number or a list")
            })?;
            match list.as_slice() {
                [one] => number(one, what),
                _ => number(
                    list.get(i).with_context(|| {
                        format!("per-block IP-Adapter scale for {what} has {} entries; attention {i} needs one", list.len())
                    })?,
                    what,
                ),
            }
        };
        let parts: Vec<&str> = path.split('.').collect();
        let s = match parts.as_slice() {
            ["mid_block", "attentions", a, ..] => match v.get("mid") {
                Some(x) => pick(x, a.parse().unwrap_or(0), "mid")?,
                None => 0.0,
            },
            [kind @ ("down_blocks" | "up_blocks"), block, "attentions", att, ..] => {
                let key = if *kind == "down_blocks" { "down" } else { "up" };
                let i: usize = att.parse().unwrap_or(0);
                match v.get(key) {
                    None => 0.0,
                    Some(x) if x.is_number() => number(x, key)?,
                    Some(x) => match x.get(format!("block_{block}")) {
                        Some(b) => pick(b, i, &format!("{key}.block_{block}"))?,
                        None => 0.0,
                    },
                }
            }
            _ => 0.0,
        };
        Ok(s * base)
    }

    /// Refuses keys that name nothing (`"upp"`, `"block_9"`), as diffusers does.
    pub fn validate(&self, unet_paths: &[String]) -> Result<()> {
        let IpScale::PerBlock(v) = self else {
            return Ok(());
        };
        let Some(obj) = v.as_object() else {
            bail!("per-block IP-Adapter scales must be a JSON object")
        };
        for (k, x) in obj {
            let prefix = match k.as_str() {
                "down" => "down_blocks",
                "up" => "up_blocks",
                "mid" => continue,
                other => bail!(
                    "per-block IP-Adapter scales: unknown key '{other}' (expected down, mid or up)"
                ),
            };
            if let Some(blocks) = x.as_object() {
                for b in blocks.keys() {
                    let n = b.strip_prefix("block_").with_context(|| {
                        format!("per-block IP-Adapter scales: '{k}.{b}' is not block_N")
                    })?;
                    let p = format!("{prefix}.{n}.attentions.");
                    if !unet_paths.iter().any(|u| u.starts_with(&p)) {
                        bail!("per-block IP-Adapter scales: '{k}.{b}' has no cross-attention in this UNet")
                    }
                }
            }
        }
        Ok(())
    }
}

/// A loaded IP-Adapter with its image encoder.
pub struct IpAdapter {
    pub image_proj: ImageProjection,
    /// `(to_k_ip, to_v_ip)` per transformer block, in diffusers' `attn_processors` order.
    layers: Vec<(Linear, Linear)>,
    pub encoder: ClipVisionModelWithProjection,
    pub processor: ImageProcessor,
    pub path: PathBuf,
}

impl IpAdapter {
    /// Loads FILE and its image encoder (`image_encoder/` beside FILE unless `encoder_dir`).
    pub fn load(
        path: &Path,
        encoder_dir: Option<&Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let enc_dir = image_encoder_dir(path, encoder_dir)?;
        let encoder = ClipVisionModelWithProjection::load(&enc_dir, dtype, device)?;
        let t = imprint_concepts::formats::ip_adapter::read_tensors(path)?;
        let get = |k: &str| -> Result<Tensor> {
            Ok(t.get(k)
                .with_context(|| format!("{}: lacks {k}", path.display()))?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let lin = |prefix: &str, bias: bool| -> Result<Linear> {
            Ok(Linear::from_weights(
                prefix,
                get(&format!("{prefix}.weight"))?,
                if bias {
                    Some(get(&format!("{prefix}.bias"))?)
                } else {
                    None
                },
            ))
        };
        let norm = |prefix: &str| -> Result<(Tensor, Tensor)> {
            Ok((
                get(&format!("{prefix}.weight"))?,
                get(&format!("{prefix}.bias"))?,
            ))
        };
        let image_proj = if t.contains_key("image_proj.latents") {
            let mut layers = vec![];
            for j in 0.. {
                let p = format!("image_proj.layers.{j}");
                if !t.contains_key(&format!("{p}.0.to_q.weight")) {
                    break;
                }
                layers.push(ResamplerLayer {
                    norm1: norm(&format!("{p}.0.norm1"))?,
                    norm2: norm(&format!("{p}.0.norm2"))?,
                    to_q: lin(&format!("{p}.0.to_q"), false)?,
                    to_kv: lin(&format!("{p}.0.to_kv"), false)?,
                    to_out: lin(&format!("{p}.0.to_out"), false)?,
                    ff_norm: norm(&format!("{p}.1.0"))?,
                    ff_in: lin(&format!("{p}.1.1"), false)?,
                    ff_out: lin(&format!("{p}.1.3"), false)?,
                });
            }
            let Some(first) = layers.first() else {
                bail!(
                    "{}: an IP-Adapter Plus file without Resampler layers",
                    path.display()
                )
            };
            // diffusers infers the heads from to_q with a head width of 64.
            let dim_head = 64;
            let heads = first.to_q.out_dim() / dim_head;
            if heads == 0 || first.to_q.out_dim() % dim_head != 0 {
                bail!(
                    "{}: Resampler to_q width {} is not a multiple of 64",
                    path.display(),
                    first.to_q.out_dim()
                )
            }
            ImageProjection::Plus(Resampler {
                latents: get("image_proj.latents")?,
                proj_in: lin("image_proj.proj_in", true)?,
                proj_out: lin("image_proj.proj_out", true)?,
                norm_out: norm("image_proj.norm_out")?,
                layers,
                heads,
                dim_head,
            })
        } else {
            let proj = lin("image_proj.proj", true)?;
            let norm = norm("image_proj.norm")?;
            let cross_dim = norm.0.dim(0)?;
            if cross_dim == 0 || proj.out_dim() % cross_dim != 0 {
                bail!("{}: image_proj.proj makes {} values, not a whole number of {cross_dim}-wide tokens", path.display(), proj.out_dim())
            }
            if proj.in_dim() != encoder.projection_dim {
                bail!(
                    "{}: image_proj takes {}-wide image embeddings, the image encoder makes {}",
                    path.display(),
                    proj.in_dim(),
                    encoder.projection_dim
                )
            }
            ImageProjection::Base {
                num_tokens: proj.out_dim() / cross_dim,
                proj,
                norm,
                cross_dim,
            }
        };
        let mut layers = vec![];
        let mut indices: Vec<usize> = t
            .keys()
            .filter_map(|k| {
                k.strip_prefix("ip_adapter.")?
                    .strip_suffix(".to_k_ip.weight")?
                    .parse()
                    .ok()
            })
            .collect();
        indices.sort_unstable();
        for (i, idx) in indices.iter().enumerate() {
            if *idx != 2 * i + 1 {
                bail!("{}: ip_adapter indices must be 1, 3, 5, … (one per cross-attention in diffusers' attn_processors order); found {idx} at position {i}", path.display())
            }
            layers.push((
                lin(&format!("ip_adapter.{idx}.to_k_ip"), false)?,
                lin(&format!("ip_adapter.{idx}.to_v_ip"), false)?,
            ));
        }
        let size = encoder.vision_model.config.image_size;
        // diffusers' default when the pipeline has no feature extractor:
        // CLIPImageProcessor(size=image_size, crop_size=image_size).
        let processor = ImageProcessor {
            resize: Some((ResizeTo::ShortestEdge(size), Resample::Bicubic)),
            center_crop: Some((size, size)),
            rescale_factor: Some(1.0 / 255.0),
            mean_std: Some((
                [0.481_454_66, 0.457_827_5, 0.408_210_73],
                [0.268_629_54, 0.261_302_58, 0.275_777_11],
            )),
        };
        Ok(Self {
            image_proj,
            layers,
            encoder,
            processor,
            path: path.to_path_buf(),
        })
    }

    /// Puts the adapter's projections on every cross-attention layer of `unet`, at `scale`.
    pub fn attach(
        &self,
        unet: &mut UNet2DConditionModel,
        scale: &IpScale,
        base: f64,
    ) -> Result<()> {
        attach_layers(
            &self.path,
            &self.layers,
            self.image_proj.num_tokens(),
            unet,
            scale,
            base,
        )
    }

    /// Image tokens `(negative, positive)`, each `[1, N, cross_dim]`, of the averaged embedding
    /// of `images`.
    pub fn tokens(&self, images: &[RgbImage]) -> Result<(Tensor, Tensor)> {
        if images.is_empty() {
            bail!("an IP-Adapter needs at least one --ip-image")
        }
        let dev = self.encoder.visual_projection.weight.device().clone();
        let dtype = self.encoder.visual_projection.weight.dtype();
        let px = self
            .processor
            .preprocess_batch(images, &dev)?
            .to_dtype(dtype)?;
        let (embeds, out) = self.encoder.forward(&px)?;
        let (pos, neg) = if self.image_proj.is_plus() {
            let h = &out.hidden_states;
            let pen = h[h.len() - 2].mean_keepdim(0)?;
            let (_, zero_out) = self.encoder.forward(&px.narrow(0, 0, 1)?.zeros_like()?)?;
            let zh = &zero_out.hidden_states;
            (pen, zh[zh.len() - 2].clone())
        } else {
            let e = embeds.mean_keepdim(0)?;
            let z = e.zeros_like()?;
            (e, z)
        };
        let both = self.image_proj.forward(&Tensor::cat(&[&neg, &pos], 0)?)?;
        Ok((both.narrow(0, 0, 1)?, both.narrow(0, 1, 1)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UP: &str = "up_blocks.1.attentions.2.transformer_blocks.0";
    const DOWN: &str = "down_blocks.0.attentions.1.transformer_blocks.0";
    const MID: &str = "mid_block.attentions.0.transformer_blocks.0";

    #[test]
    fn per_block_scales_expand_as_diffusers() -> Result<()> {
        let s = IpScale::PerBlock(json!({"up": {"block_1": [0.0, 0.5, 1.0]}}));
        assert_eq!(s.for_block(UP, 0.8)?, 0.8);
        assert_eq!(s.for_block(DOWN, 0.8)?, 0.0);
        assert_eq!(s.for_block(MID, 0.8)?, 0.0);
        let s = IpScale::PerBlock(json!({"down": 0.5, "mid": [0.25], "up": {"block_1": [2.0]}}));
        assert_eq!(s.for_block(DOWN, 1.0)?, 0.5);
        assert_eq!(s.for_block(MID, 1.0)?, 0.25);
        assert_eq!(s.for_block(UP, 1.0)?, 2.0);
        assert_eq!(IpScale::All(0.7).for_block(UP, 1.0)?, 0.7);
        let short = IpScale::PerBlock(json!({"up": {"block_1": [0.0, 1.0]}}));
        assert!(short.for_block(UP, 1.0).is_err());
        let paths = vec![UP.to_string(), DOWN.to_string(), MID.to_string()];
        assert!(IpScale::PerBlock(json!({"upp": 1.0}))
            .validate(&paths)
            .is_err());
        assert!(IpScale::PerBlock(json!({"up": {"block_9": 1.0}}))
            .validate(&paths)
            .is_err());
        assert!(IpScale::PerBlock(json!({"up": {"block_1": 1.0}}))
            .validate(&paths)
            .is_ok());
        Ok(())
    }
}
