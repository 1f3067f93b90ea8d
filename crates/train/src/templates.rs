//! Caption templates.
