//! Parasync client (being written).
