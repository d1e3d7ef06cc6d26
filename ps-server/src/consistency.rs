//! Consistency state machines (placeholder, being written).
