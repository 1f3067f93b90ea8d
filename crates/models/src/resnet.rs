//! ResNet blocks and the down/up samplers shared by the UNet and the VAE (diffusers
//! `models/resnet.py`, `models/downsampling.py`, `models/upsampling.py`).

use crate::visit::{Norm, Projection, VisitProjections};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{
    checkpoint, upsample_nearest2x, BlockFn, Checkpointing, Conv2d, Conv2dConfig, GroupNorm, Linear,
};
use std::sync::Arc;

/// `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, and an optional time embedding.
#[derive(Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
    /// Recompute this block in the backward pass instead of keeping its activations.
    pub checkpointing: Option<Checkpointing>,
}

pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, c: &ResnetConfig) -> Result<Self> {
        let conv3 = Conv2dConfig {
            padding: 1,
            stride: 1,
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(Conv2d::new(
                vb.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                Conv2dConfig::default(),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), c.in_channels, c.out_channels, 3, conv3)?,
            time_emb_proj: match c.temb_channels {
                Some(t) => Some(Linear::new(
                    vb.pp("time_emb_proj"),
                    t,
                    c.out_channels,
                    true,
                )?),
                None => None,
            },
            norm2: GroupNorm::new(vb.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), c.out_channels, c.out_channels, 3, conv3)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
            checkpointing: None,
        })
    }

    /// `temb` is the UNet's time embedding `[B, T]` (before the block's SiLU), or `None` in the VAE.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        if let (Some(ckpt), Some(temb)) = (&self.checkpointing, temb) {
            let mut block = self.clone();
            block.checkpointing = None;
            let f: BlockFn = Arc::new(move |x: &Tensor, t: &Tensor| block.forward(x, Some(t)));
            return checkpoint(x, temb, f, ckpt);
        }
        self.forward_inner(x, temb)
    }

    fn forward_inner(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                h.broadcast_add(&proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

impl VisitProjections for ResnetBlock2D {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        f(Projection::Conv2d(&mut self.conv1));
        if let Some(l) = &mut self.time_emb_proj {
            f(Projection::Linear(l));
        }
        f(Projection::Conv2d(&mut self.conv2));
        if let Some(c) = &mut self.conv_shortcut {
            f(Projection::Conv2d(c));
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        f(Norm::Group(&mut self.norm1));
        f(Norm::Group(&mut self.norm2));
    }
}

/// `Downsample2D` with a convolution. With `padding == 0` (the VAE) diffusers pads right and bottom
/// by one first, so the stride-2 conv sees the same window as the padded UNet one.
#[derive(Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let conv = Conv2d::new(
            vb.pp("conv"),
            channels,
            channels,
            3,
            Conv2dConfig { padding, stride: 2 },
        )?;
        Ok(Self { conv, padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D`: nearest 2× (or to an explicit size) then a 3×3 conv.
#[derive(Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                vb.pp("conv"),
                channels,
                channels,
                3,
                Conv2dConfig {
                    padding: 1,
                    stride: 1,
                },
            )?,
        })
    }

    /// `size` is the skip connection's spatial size when it is not exactly twice the input's
    /// (diffusers' `upsample_size` for latents not divisible by the UNet's overall factor).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let up = match size {
            Some((th, tw)) if (th, tw) != (2 * h, 2 * w) => x.upsample_nearest2d(th, tw)?,
            _ => upsample_nearest2x(x)?,
        };
        self.conv.forward(&up)
    }
}
