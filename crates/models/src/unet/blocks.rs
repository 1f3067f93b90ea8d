//! The UNet's down, mid and up blocks (diffusers `models/unets/unet_2d_blocks.py`).

use crate::attention::{TextConditioning, Transformer2DConfig, Transformer2DModel};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::visit::{Norm, Projection, VisitProjections};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// What every block of one UNet shares.
#[derive(Clone, Copy, Debug)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub use_linear_projection: bool,
}

/// Settings of the cross-attention part of a block.
#[derive(Clone, Copy, Debug)]
pub struct CrossAttnSettings {
    pub heads: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
}

fn resnet(
    vb: VarBuilder,
    inp: usize,
    out: usize,
    c: &BlockCommon,
    scale: f64,
) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(
        vb,
        &ResnetConfig {
            in_channels: inp,
            out_channels: out,
            temb_channels: Some(c.temb_channels),
            groups: c.groups,
            eps: c.eps,
            output_scale_factor: scale,
        },
    )
}

fn transformer(
    vb: VarBuilder,
    channels: usize,
    a: &CrossAttnSettings,
    c: &BlockCommon,
    index: usize,
) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        vb,
        &Transformer2DConfig {
            channels,
            heads: a.heads,
            depth: a.depth,
            cross_attention_dim: a.cross_attention_dim,
            norm_num_groups: c.groups,
            use_linear_projection: c.use_linear_projection,
        },
        index,
    )
}

/// `DownBlock2D` (no attention) or `CrossAttnDownBlock2D`.
#[derive(Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `cross_attention_index` is the running count of cross-attention layers, advanced here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        num_layers: usize,
        in_c: usize,
        out_c: usize,
        attn: Option<CrossAttnSettings>,
        add_downsample: bool,
        downsample_padding: usize,
        c: &BlockCommon,
        cross_attention_index: &mut usize,
    ) -> Result<Self> {
        let mut resnets = vec![];
        let mut attentions = vec![];
        for i in 0..num_layers {
            let inp = if i == 0 { in_c } else { out_c };
            resnets.push(resnet(vb.pp("resnets").pp(i), inp, out_c, c, 1.0)?);
            if let Some(a) = &attn {
                attentions.push(transformer(
                    vb.pp("attentions").pp(i),
                    out_c,
                    a,
                    c,
                    *cross_attention_index,
                )?);
                *cross_attention_index += a.depth;
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers.0"),
                out_c,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and the states it hands to the up path's skip connections.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        cond: TextConditioning,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = vec![];
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, cond)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

impl VisitProjections for DownBlock {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit_projections(f);
            if let Some(a) = self.attentions.get_mut(i) {
                a.visit_projections(f);
            }
        }
        if let Some(d) = &mut self.downsampler {
            f(Projection::Conv2d(&mut d.conv));
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit_norms(f);
            if let Some(a) = self.attentions.get_mut(i) {
                a.visit_norms(f);
            }
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) pairs.
#[derive(Clone)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        attn: CrossAttnSettings,
        scale: f64,
        c: &BlockCommon,
        cross_attention_index: &mut usize,
    ) -> Result<Self> {
        let resnets = vec![
            resnet(vb.pp("resnets.0"), channels, channels, c, scale)?,
            resnet(vb.pp("resnets.1"), channels, channels, c, scale)?,
        ];
        let attentions = vec![transformer(
            vb.pp("attentions.0"),
            channels,
            &attn,
            c,
            *cross_attention_index,
        )?];
        *cross_attention_index += attn.depth;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, cond: TextConditioning) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = a.forward(&h, cond)?;
            h = r.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

impl VisitProjections for MidBlock {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        self.resnets[0].visit_projections(f);
        for (a, r) in self.attentions.iter_mut().zip(self.resnets[1..].iter_mut()) {
            a.visit_projections(f);
            r.visit_projections(f);
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        self.resnets[0].visit_norms(f);
        for (a, r) in self.attentions.iter_mut().zip(self.resnets[1..].iter_mut()) {
            a.visit_norms(f);
            r.visit_norms(f);
        }
    }
}

/// `UpBlock2D` or `CrossAttnUpBlock2D`: each resnet takes the previous state concatenated with a
/// skip connection from the down path.
#[derive(Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        num_layers: usize,
        in_c: usize,
        out_c: usize,
        prev_out_c: usize,
        attn: Option<CrossAttnSettings>,
        add_upsample: bool,
        c: &BlockCommon,
        cross_attention_index: &mut usize,
    ) -> Result<Self> {
        let mut resnets = vec![];
        let mut attentions = vec![];
        for i in 0..num_layers {
            let skip_c = if i == num_layers - 1 { in_c } else { out_c };
            let inp = if i == 0 { prev_out_c } else { out_c };
            resnets.push(resnet(vb.pp("resnets").pp(i), inp + skip_c, out_c, c, 1.0)?);
            if let Some(a) = &attn {
                attentions.push(transformer(
                    vb.pp("attentions").pp(i),
                    out_c,
                    a,
                    c,
                    *cross_attention_index,
                )?);
                *cross_attention_index += a.depth;
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(vb.pp("upsamplers.0"), out_c)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// `skips` are this block's skip states, in the order they are consumed (last produced first).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        cond: TextConditioning,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, r) in self.resnets.iter().enumerate() {
            h = Tensor::cat(&[&h, &skips[i]], 1)?;
            h = r.forward(&h, Some(temb))?;
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, cond)?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}

impl VisitProjections for UpBlock {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit_projections(f);
            if let Some(a) = self.attentions.get_mut(i) {
                a.visit_projections(f);
            }
        }
        if let Some(u) = &mut self.upsampler {
            f(Projection::Conv2d(&mut u.conv));
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        for (i, r) in self.resnets.iter_mut().enumerate() {
            r.visit_norms(f);
            if let Some(a) = self.attentions.get_mut(i) {
                a.visit_norms(f);
            }
        }
    }
}
