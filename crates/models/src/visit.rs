//! The adapter hook's traversal: every linear and conv projection of a network, by name.

use imprint_ops::{Conv2d, Linear};

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

/// Visits every projection of a network in a fixed order.
pub trait VisitProjections {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>));
}

impl<T: VisitProjections> VisitProjections for Vec<T> {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        for t in self.iter_mut() {
            t.visit_projections(f)
        }
    }
}

impl<T: VisitProjections> VisitProjections for Option<T> {
    fn visit_projections(&mut self, f: &mut dyn FnMut(Projection<'_>)) {
        if let Some(t) = self {
            t.visit_projections(f)
        }
    }
}
