//! `AutoencoderKL` (diffusers `models/autoencoders/autoencoder_kl.py`, `vae.py`): the encoder to
//! latent mean/log-variance and the decoder back to pixels.

use crate::attention::SpatialSelfAttention;
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{Conv2d, Conv2dConfig, GroupNorm};
use serde::Deserialize;

/// `vae/config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default = "scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn groups() -> usize {
    32
}
fn scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl AutoencoderKLConfig {
    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!("vae/config.json: block_out_channels, down_block_types and up_block_types must have the same non-zero length")
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("vae/config.json: unsupported down block type '{t}' (supported: DownEncoderBlock2D)")
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("vae/config.json: unsupported up block type '{t}' (supported: UpDecoderBlock2D)")
        }
        if self.act_fn != "silu" {
            bail!("vae/config.json: unsupported act_fn '{}'", self.act_fn)
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            bail!(
                "vae/config.json: {c} channels are not divisible into {} norm groups",
                self.norm_num_groups
            )
        }
        Ok(())
    }
}

fn vae_resnet(
    vb: VarBuilder,
    inp: usize,
    out: usize,
    groups: usize,
) -> candle_core::Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        &ResnetConfig {
            in_channels: inp,
            out_channels: out,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        },
    )
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Clone)]
struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize, add_attention: bool) -> Result<Self> {
        Ok(Self {
            resnets: [
                vae_resnet(vb.pp("resnets.0"), c, c, groups)?,
                vae_resnet(vb.pp("resnets.1"), c, c, groups)?,
            ],
            attention: if add_attention {
                Some(SpatialSelfAttention::new(
                    vb.pp("attentions.0"),
                    c,
                    groups,
                    1e-6,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

#[derive(Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let pad1 = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let mut down_blocks = vec![];
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    vae_resnet(
                        vbb.pp("resnets").pp(j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let downsampler = if i + 1 < boc.len() {
                Some(Downsample2D::new(vbb.pp("downsamplers.0"), out_c, 0)?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let last = *boc.last().unwrap();
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, pad1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, pad1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &b.downsampler {
                h = d.forward(&h)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = boc.len();
        let pad1 = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let last = boc[n - 1];
        let mut up_blocks = vec![];
        let mut out_c = last;
        for i in 0..n {
            let prev = out_c;
            out_c = boc[n - 1 - i];
            let vbb = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    vae_resnet(
                        vbb.pp("resnets").pp(j),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        g,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vbb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        Ok(Self {
            conv_in: Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, last, 3, pad1)?,
            mid_block: VaeMidBlock::new(vb.pp("mid_block"), last, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, boc[0], 1e-6)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), boc[0], cfg.out_channels, 3, pad1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &b.upsampler {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The latent distribution the encoder predicts.
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [−30, 20] as diffusers' `DiagonalGaussianDistribution`.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + exp(logvar / 2) · noise`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        Ok((&self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)?)
    }
}

#[derive(Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        let one = Conv2dConfig::default();
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, one)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, one)?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.encoder.conv_in.weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.encoder.conv_in.weight.dtype()
    }

    /// Pixels `[B, 3, H, W]` in [−1, 1] → latent distribution (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<LatentDistribution> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(LatentDistribution { mean, logvar })
    }

    /// Unscaled latents → pixels in about [−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        Ok(self.decoder.forward(&z)?)
    }

    /// Latents as the UNet sees them: `(z − shift) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok(z.affine(
            self.config.scaling_factor,
            -shift * self.config.scaling_factor,
        )?)
    }

    /// The inverse of [`Self::scale_latents`].
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok(z.affine(1.0 / self.config.scaling_factor, shift)?)
    }
}
