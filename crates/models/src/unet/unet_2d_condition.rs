//! `UNet2DConditionModel` (diffusers `models/unets/unet_2d_condition.py`) for SD 1.x/2.x.

use super::blocks::{BlockCommon, CrossAttnSettings, DownBlock, MidBlock, UpBlock};
use super::config::{BlockKind, UNet2DConditionConfig};
use crate::attention::TextConditioning;
use crate::visit::{Norm, Projection, VisitProjections};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use imprint_ops::{Conv2d, Conv2dConfig, GroupNorm, Linear};

/// Sinusoidal timestep features (`Timesteps` / `get_timestep_embedding`), computed in f32 as the
/// reference does.
fn timestep_features(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let exponent =
        (Tensor::arange(0u32, half as u32, dev)?.to_dtype(DType::F32)? * (-(10000f64.ln())))?;
    let exponent = (exponent / (half as f64 - freq_shift))?;
    let freqs = exponent.exp()?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Clone)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::new(vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// The denoising UNet.
#[derive(Clone)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub config: UNet2DConditionConfig,
    /// Number of cross-attention layers, in forward order (the length `PerLayer` conditioning needs).
    pub num_cross_attention_layers: usize,
    /// Set by [`Self::enable_gradient_checkpointing`]: gradients of variables inside recomputed blocks.
    pub gradient_checkpointing: Option<imprint_ops::SideGrads>,
    /// Mixed precision ([`Self::set_mixed_precision`]): the dtype activations are computed in,
    /// whatever the weights' dtype; `forward` answers in its input's dtype.
    pub compute_dtype: Option<DType>,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let r = cfg.resolve()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let common = BlockCommon {
            temb_channels: r.time_embed_dim,
            groups: r.groups,
            eps: cfg.norm_eps,
            use_linear_projection: cfg.use_linear_projection,
        };
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            Conv2dConfig {
                padding: (cfg.conv_in_kernel - 1) / 2,
                stride: 1,
            },
        )?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], r.time_embed_dim)?;
        let attn = |i: usize| CrossAttnSettings {
            heads: r.heads[i],
            depth: r.transformer_layers[i],
            cross_attention_dim: r.cross_attention_dim[i],
        };
        let mut index = 0;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for i in 0..n {
            let in_c = out_c;
            out_c = boc[i];
            let a = (r.down[i] == BlockKind::CrossAttn).then(|| attn(i));
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                r.layers_per_block[i],
                in_c,
                out_c,
                a,
                i + 1 < n,
                cfg.downsample_padding,
                &common,
                &mut index,
            )?);
        }
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            boc[n - 1],
            attn(n - 1),
            cfg.mid_block_scale_factor,
            &common,
            &mut index,
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = boc[n - 1];
        for i in 0..n {
            let rev = n - 1 - i;
            let prev_out = out_c;
            out_c = boc[rev];
            let in_c = boc[rev.saturating_sub(1)];
            let a = (r.up[i] == BlockKind::CrossAttn).then(|| attn(rev));
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                r.layers_per_block[rev] + 1,
                in_c,
                out_c,
                prev_out,
                a,
                i + 1 < n,
                &common,
                &mut index,
            )?);
        }
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), r.groups, boc[0], cfg.norm_eps)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            Conv2dConfig {
                padding: (cfg.conv_out_kernel - 1) / 2,
                stride: 1,
            },
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: cfg.clone(),
            num_cross_attention_layers: index,
            gradient_checkpointing: None,
            compute_dtype: None,
        })
    }

    pub fn device(&self) -> &Device {
        self.conv_in.weight.device()
    }

    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }

    /// Predicts noise (or v) for `sample [B, C, h, w]` at `timesteps` (`[B]` or `[]`, any numeric
    /// dtype) given the text conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: TextConditioning,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4()?;
        if c != self.config.in_channels {
            bail!(
                "unet: sample has {c} channels, the model expects {}",
                self.config.in_channels
            )
        }
        let timesteps = match timesteps.rank() {
            0 => timesteps.unsqueeze(0)?.broadcast_as(b)?,
            1 if timesteps.dim(0)? == b => timesteps.clone(),
            1 if timesteps.dim(0)? == 1 => timesteps.broadcast_as(b)?,
            _ => bail!(
                "unet: timestep shape {:?} does not match batch {b}",
                timesteps.dims()
            ),
        };
        // Mixed precision: compute in `compute_dtype` and answer in the caller's dtype.
        let out_dtype = sample.dtype();
        let sample = match self.compute_dtype {
            Some(dt) => sample.to_dtype(dt)?,
            None => sample.clone(),
        };
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample
        };
        let t_features = timestep_features(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(sample.dtype())?;
        let temb = self.time_embedding.forward(&t_features)?;

        let n_up = self
            .up_blocks
            .iter()
            .filter(|u| u.upsampler.is_some())
            .count();
        let factor = 1usize << n_up;
        let forward_upsample_size = h % factor != 0 || w % factor != 0;

        let mut x = self.conv_in.forward(&sample)?;
        let mut skips = vec![x.clone()];
        for d in &self.down_blocks {
            let (out, s) = d.forward(&x, &temb, cond)?;
            x = out;
            skips.extend(s);
        }
        x = self.mid_block.forward(&x, &temb, cond)?;
        for u in &self.up_blocks {
            let k = u.resnets.len();
            let mine: Vec<Tensor> = skips.split_off(skips.len() - k).into_iter().rev().collect();
            let size = match (forward_upsample_size, skips.last()) {
                (true, Some(s)) => Some((s.dim(2)?, s.dim(3)?)),
                _ => None,
            };
            x = u.forward(&x, &mine, &temb, cond, size)?;
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        Ok(self.conv_out.forward(&x)?.to_dtype(out_dtype)?)
    }
}

/// One cross-attention layer (`attn2` of a transformer block), in the UNet's forward order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrossAttentionLayer {
    /// Its index in forward order: the entry of per-layer conditioning it reads.
    pub index: usize,
    /// The transformer block's module path, e.g. `down_blocks.0.attentions.1.transformer_blocks.0`.
    pub block: String,
    /// The enclosing `Transformer2DModel`'s path, e.g. `down_blocks.0.attentions.1`.
    pub transformer: String,
}

impl CrossAttentionLayer {
    /// The name per-layer embeddings (P+) are keyed by: the transformer's path when it holds one
    /// block (every SD 1.x/2.x layer), else the block's path.
    pub fn embedding_key(&self, blocks_in_transformer: usize) -> &str {
        if blocks_in_transformer == 1 {
            &self.transformer
        } else {
            &self.block
        }
    }

    /// The cross-attention module's path, e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub fn attn2(&self) -> String {
        format!("{}.attn2", self.block)
    }
}

impl UNet2DConditionModel {
    /// Every cross-attention transformer, in forward order (down, mid, up).
    pub fn transformers(&self) -> Vec<&crate::attention::Transformer2DModel> {
        let down = self.down_blocks.iter().flat_map(|d| &d.attentions);
        let mid = self.mid_block.attentions.iter();
        let up = self.up_blocks.iter().flat_map(|u| &u.attentions);
        down.chain(mid).chain(up).collect()
    }

    /// Every transformer block with its module path, in the order of diffusers' `attn_processors`
    /// (down blocks, then up blocks, then the mid block: the order modules were registered in, not
    /// forward order). That order numbers IP-Adapter's weights: the cross-attention (`attn2`) of
    /// the i-th block here is processor `2i + 1`.
    pub fn transformer_blocks_in_processor_order_mut(
        &mut self,
    ) -> Vec<(String, &mut crate::attention::BasicTransformerBlock)> {
        let down = self.down_blocks.iter_mut().flat_map(|d| &mut d.attentions);
        let up = self.up_blocks.iter_mut().flat_map(|u| &mut u.attentions);
        let mid = self.mid_block.attentions.iter_mut();
        down.chain(up)
            .chain(mid)
            .flat_map(|t| t.transformer_blocks.iter_mut())
            .map(|b| {
                let path = b
                    .attn2
                    .to_k
                    .name
                    .trim_end_matches(".attn2.to_k")
                    .to_string();
                (path, b)
            })
            .collect()
    }

    /// Every cross-attention layer in forward order, with its module paths.
    pub fn cross_attention_layers(&self) -> Vec<CrossAttentionLayer> {
        let mut layers = vec![];
        for t in self.transformers() {
            for b in &t.transformer_blocks {
                let block = b
                    .attn2
                    .to_k
                    .name
                    .trim_end_matches(".attn2.to_k")
                    .to_string();
                let transformer = block
                    .rsplit_once(".transformer_blocks.")
                    .map_or(block.clone(), |(t, _)| t.to_string());
                layers.push(CrossAttentionLayer {
                    index: b.cross_attention_index,
                    block,
                    transformer,
                });
            }
        }
        layers.sort_by_key(|l| l.index);
        layers
    }

    /// The keys per-layer embeddings (P+) use for this UNet, in forward order.
    pub fn embedding_keys(&self) -> Vec<String> {
        let layers = self.cross_attention_layers();
        let mut keys = vec![String::new(); layers.len()];
        for t in self.transformers() {
            let n = t.transformer_blocks.len();
            for b in &t.transformer_blocks {
                let i = b.cross_attention_index;
                keys[i] = layers[i].embedding_key(n).to_string();
            }
        }
        keys
    }
}

impl UNet2DConditionModel {
    /// Recompute every resnet and transformer block in the backward pass (gradient
    /// checkpointing); returns where the gradients of variables inside them are collected.
    pub fn enable_gradient_checkpointing(&mut self) -> candle_core::Result<imprint_ops::SideGrads> {
        let ckpt = imprint_ops::Checkpointing::new(self.conv_in.weight.device())?;
        let side = ckpt.side.clone();
        let set = |resnets: &mut Vec<crate::resnet::ResnetBlock2D>,
                   attentions: &mut Vec<crate::attention::Transformer2DModel>| {
            resnets
                .iter_mut()
                .for_each(|r| r.checkpointing = Some(ckpt.clone()));
            attentions
                .iter_mut()
                .for_each(|a| a.checkpointing = Some(ckpt.clone()));
        };
        for d in &mut self.down_blocks {
            set(&mut d.resnets, &mut d.attentions);
        }
        set(&mut self.mid_block.resnets, &mut self.mid_block.attentions);
        for u in &mut self.up_blocks {
            set(&mut u.resnets, &mut u.attentions);
        }
        self.gradient_checkpointing = Some(side.clone());
        Ok(side)
    }
}

impl UNet2DConditionModel {
    /// Mixed precision, as diffusers' `--mixed_precision fp16|bf16`: every frozen weight (a tensor
    /// that is not a `Var`) is stored in `dtype`, trainable weights keep theirs (f32, and so do
    /// their gradients and optimizer state), and activations are computed in `dtype`; imprint-ops
    /// casts an f32 weight where it meets them, differentiably.
    pub fn set_mixed_precision(&mut self, dtype: DType) -> Result<()> {
        let mut failed = None;
        let mut cast = |t: &mut Tensor| {
            if !t.is_variable() && t.dtype() != dtype {
                match t.to_dtype(dtype) {
                    Ok(c) => *t = c,
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
        };
        self.visit_projections(&mut |p| match p {
            Projection::Linear(l) => {
                cast(&mut l.weight);
                if let Some(b) = &mut l.bias {
                    cast(b)
                }
            }
            Projection::Conv2d(c) => {
                cast(&mut c.weight);
                if let Some(b) = &mut c.bias {
                    cast(b)
                }
            }
        });
        self.visit_norms(&mut |n| match n {
            Norm::Group(g) => {
                cast(&mut g.weight);
                cast(&mut g.bias);
            }
            Norm::Layer(l) => {
                cast(&mut l.weight);
                cast(&mut l.bias);
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        self.compute_dtype = Some(dtype);
        Ok(())
    }
}

impl VisitProjections for UNet2DConditionModel {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        f(Projection::Conv2d(&mut self.conv_in));
        f(Projection::Linear(&mut self.time_embedding.linear_1));
        f(Projection::Linear(&mut self.time_embedding.linear_2));
        self.down_blocks.visit_projections(f);
        self.mid_block.visit_projections(f);
        self.up_blocks.visit_projections(f);
        f(Projection::Conv2d(&mut self.conv_out));
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        self.down_blocks.visit_norms(f);
        self.mid_block.visit_norms(f);
        self.up_blocks.visit_norms(f);
        f(Norm::Group(&mut self.conv_norm_out));
    }
}
