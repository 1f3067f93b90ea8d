//! Quality metrics for personalization: CLIP-I, CLIP-T and DINO as the DreamBooth paper's
//! DreamBench protocol defines them, on real transformers `CLIPModel` / `ViTModel` folders.
//!
//! - [`clip`]: `CLIPModel` (text and vision towers, projections).
//! - [`vit`]: `ViTModel` (DINO's backbone; CLS after the final layer norm).
//! - [`preprocess`]: the CLIP and ViT image processors, with Pillow's resampling bit for bit.
//! - [`metrics`]: the three metrics over folders of images.
//! - [`dreambench`]: the whole protocol over google/dreambooth's dataset layout.

pub mod attribute;
pub mod clip;
pub mod dreambench;
pub mod metrics;
pub mod vit;

/// The image processors (moved to the models crate, where IP-Adapter's image encoder uses them).
pub use imprint_models::image_processor as preprocess;

pub use clip::{ClipConfig, ClipModel};
pub use imprint_models::clip_vision::{ClipVisionConfig, ClipVisionTransformer};
pub use metrics::{Evaluator, ImageFeatures, Scores};
pub use preprocess::{ImageProcessor, Resample};
pub use vit::{ViTConfig, ViTModel};
