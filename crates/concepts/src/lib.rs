//! Concepts.
