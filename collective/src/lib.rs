//! Parasync collectives (being written).
