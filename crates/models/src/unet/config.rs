//! `unet/config.json` of `UNet2DConditionModel`: parsing, defaults, and the checks that refuse what
//! imprint does not compute.

use anyhow::{bail, Result};
use serde::Deserialize;

/// A config value diffusers accepts either once for all blocks or per block.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks; a list must have exactly `n` entries.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(vs) if vs.len() == n => Ok(vs.clone()),
            PerBlock::Each(vs) => bail!(
                "unet/config.json: {field} has {} entries for {n} blocks",
                vs.len()
            ),
        }
    }
}

/// The fields of `UNet2DConditionModel`'s config that the SD 1.x/2.x architectures use.
#[derive(Clone, Debug, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "no_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn two() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn no_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn silu() -> String {
    "silu".into()
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_shift() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_attention_type() -> String {
    "default".into()
}

/// Down/up block kinds of SD 1.x/2.x.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    CrossAttn,
}

/// The config resolved per block, after validation.
#[derive(Clone, Debug)]
pub struct ResolvedUNetConfig {
    pub down: Vec<BlockKind>,
    pub up: Vec<BlockKind>,
    pub layers_per_block: Vec<usize>,
    pub transformer_layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub groups: usize,
    pub time_embed_dim: usize,
}

impl UNet2DConditionConfig {
    /// Checks every field that changes the math and resolves per-block values; an unsupported
    /// value is an error naming the field, never a silent different computation.
    pub fn resolve(&self) -> Result<ResolvedUNetConfig> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("unet/config.json: block_out_channels is empty")
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "unet/config.json: {} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )
        }
        let kind = |t: &str, plain: &str, cross: &str| -> Result<BlockKind> {
            if t == plain {
                Ok(BlockKind::Plain)
            } else if t == cross {
                Ok(BlockKind::CrossAttn)
            } else {
                bail!(
                    "unet/config.json: unsupported block type '{t}' (supported: {plain}, {cross})"
                )
            }
        };
        let down = self
            .down_block_types
            .iter()
            .map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        let up = self
            .up_block_types
            .iter()
            .map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D"))
            .collect::<Result<Vec<_>>>()?;
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => bail!("unet/config.json: unsupported mid_block_type {other:?} (supported: UNetMidBlock2DCrossAttn)"),
        }
        let unsupported = |field: &str, value: &dyn std::fmt::Debug| -> Result<()> {
            bail!("unet/config.json: unsupported {field} {value:?}")
        };
        if self.act_fn != "silu" {
            unsupported("act_fn", &self.act_fn)?
        }
        if self.resnet_time_scale_shift != "default" {
            unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift)?
        }
        if self.time_embedding_type != "positional" {
            unsupported("time_embedding_type", &self.time_embedding_type)?
        }
        if let Some(a) = &self.time_embedding_act_fn {
            unsupported("time_embedding_act_fn", a)?
        }
        if let Some(a) = &self.timestep_post_act {
            unsupported("timestep_post_act", a)?
        }
        if self.time_cond_proj_dim.is_some() {
            unsupported("time_cond_proj_dim", &self.time_cond_proj_dim)?
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            unsupported("class_embed_type", &self.class_embed_type)?
        }
        if self.addition_embed_type.is_some() {
            unsupported("addition_embed_type", &self.addition_embed_type)?
        }
        if self.encoder_hid_dim.is_some() {
            unsupported("encoder_hid_dim", &self.encoder_hid_dim)?
        }
        if self.dual_cross_attention {
            unsupported("dual_cross_attention", &true)?
        }
        if self.attention_type != "default" {
            unsupported("attention_type", &self.attention_type)?
        }
        if let Some(norm) = &self.cross_attention_norm {
            unsupported("cross_attention_norm", norm)?
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            unsupported("only_cross_attention", &true)?
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            bail!("unet/config.json: conv_in_kernel and conv_out_kernel must be odd")
        }
        let Some(groups) = self.norm_num_groups else {
            bail!("unet/config.json: norm_num_groups null is not supported")
        };
        // diffusers' naming quirk: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        // diffusers refuses `num_attention_heads` for this model (a naming issue, diffusers#2011):
        // `attention_head_dim` holds the number of heads.
        if self.num_attention_heads.is_some() {
            bail!("unet/config.json: num_attention_heads is not supported by UNet2DConditionModel (diffusers refuses it too); set attention_head_dim")
        }
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                bail!("unet/config.json: block {i} has {c} channels, not divisible into {h} attention heads")
            }
            if c % groups != 0 {
                bail!("unet/config.json: block {i} has {c} channels, not divisible into {groups} norm groups")
            }
        }
        Ok(ResolvedUNetConfig {
            down,
            up,
            layers_per_block: self.layers_per_block.expand(n, "layers_per_block")?,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
            heads,
            cross_attention_dim: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            groups,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
        })
    }
}
