//! Training images: loading, orientation, crops, flips (see the module docs once written).
