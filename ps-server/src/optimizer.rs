//! Server-side optimizers (placeholder, being written).
