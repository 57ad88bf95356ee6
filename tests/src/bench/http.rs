//! Tier placeholder.
