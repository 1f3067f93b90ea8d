//! The adapter hook's traversal: every linear and conv projection of a network, by name.

use imprint_ops::{Conv2d, GroupNorm, LayerNorm, Linear};

/// A projection that adapters (LoRA, ...) can attach to; its `name` is the reference module path.
pub enum Projection<'a> {
    Linear(&'a mut Linear),
    Conv2d(&'a mut Conv2d),
}

impl Projection<'_> {
    pub fn name(&self) -> &str {
        match self {
            Projection::Linear(l) => &l.name,
            Projection::Conv2d(c) => &c.name,
        }
    }
}

/// A normalization layer with an affine weight (SVDiff shifts its one singular value).
pub enum Norm<'a> {
    Group(&'a mut GroupNorm),
    Layer(&'a mut LayerNorm),
}

impl Norm<'_> {
    pub fn name(&self) -> &str {
        match self {
            Norm::Group(n) => &n.name,
            Norm::Layer(n) => &n.name,
        }
    }

    /// The weight and its trainable shift.
    pub fn parts(&mut self) -> (&mut candle_core::Tensor, &mut Option<candle_core::Tensor>) {
        match self {
            Norm::Group(n) => (&mut n.weight, &mut n.weight_shift),
            Norm::Layer(n) => (&mut n.weight, &mut n.weight_shift),
        }
    }
}

/// Visits every projection of a network in a fixed order; [`VisitProjections::visit_norms`]
/// visits its normalization layers (the networks SVDiff tunes implement it).
pub trait VisitProjections {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>));
    fn visit_norms(&mut self, _f: &mut dyn FnMut(Norm<'_>)) {}
}

impl<T: VisitProjections> VisitProjections for Vec<T> {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for t in self.iter_mut() {
            t.visit_projections(f)
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        for t in self.iter_mut() {
            t.visit_norms(f)
        }
    }
}

impl<T: VisitProjections> VisitProjections for Option<T> {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        if let Some(t) = self {
            t.visit_projections(f)
        }
    }
    fn visit_norms(&mut self, f: &mut dyn FnMut(Norm<'_>)) {
        if let Some(t) = self {
            t.visit_norms(f)
        }
    }
}
