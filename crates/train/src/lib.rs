//! Training: datasets and caches, personalization methods, the trainer loop, optimizers, learning
//! rate schedules, checkpoints and resume, validation.

pub mod data;
pub mod templates;
