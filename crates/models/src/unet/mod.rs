//! The denoising UNet, laid out as diffusers draws it: `config` (config.json), `blocks`
//! (down/mid/up blocks), `unet_2d_condition` (the model).

pub mod blocks;
pub mod config;
pub mod unet_2d_condition;

pub use config::UNet2DConditionConfig;
pub use unet_2d_condition::{CrossAttentionLayer, UNet2DConditionModel};
