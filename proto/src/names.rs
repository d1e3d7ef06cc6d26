//! What a variable name may be, and how error messages quote strings a user sent.
//!
//! Both ends check names: the client before it sends anything, the server on every
//! registration. Errors quote at most [`MAX_QUOTED_BYTES`] of a user's string, so a long
//! name never turns into a reply larger than gRPC's metadata limit.

use std::fmt;

/// Longest variable name a user may give, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Room on the server for the `/part-i-of-n` suffix the client adds to a split variable's
/// parts.
pub const PART_SUFFIX_BYTES: usize = 40;

/// Most bytes of a user's string an error message repeats.
pub const MAX_QUOTED_BYTES: usize = 200;

/// Checks a name: 1 to `max_bytes` bytes of UTF-8, no control characters (no NUL, CR, LF
/// or tab: a name must not split a log line), not only whitespace. Says what is wrong.
pub fn check_name(name: &str, max_bytes: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max_bytes {
        return Err(format!("a variable name must have 1 to {max_bytes} bytes, this one has {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("a variable name must not contain control characters (found {:?})", c));
    }
    if name.chars().all(char::is_whitespace) {
        return Err("a variable name must not be only whitespace".into());
    }
    Ok(())
}

/// A user's string as an error message shows it: Rust-quoted (escapes visible), cut to
/// [`MAX_QUOTED_BYTES`] bytes with the full length noted.
#[derive(Clone, Copy, Debug)]
pub struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= MAX_QUOTED_BYTES {
            return write!(f, "{s:?}");
        }
        let mut end = MAX_QUOTED_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &s[..end], s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("layer1/weight", MAX_NAME_BYTES).is_ok());
        assert!(check_name("ünïcode ok", MAX_NAME_BYTES).is_ok());
        assert!(check_name(&"a".repeat(256), MAX_NAME_BYTES).is_ok());
        assert!(check_name(&"a".repeat(257), MAX_NAME_BYTES).unwrap_err().contains("1 to 256 bytes, this one has 257"));
        assert!(check_name("", MAX_NAME_BYTES).is_err());
        for bad in ["a\0b", "a\nb", "a\r", "\tx", "x\u{7f}"] {
            assert!(check_name(bad, MAX_NAME_BYTES).unwrap_err().contains("control characters"), "{bad:?}");
        }
        assert!(check_name("   ", MAX_NAME_BYTES).unwrap_err().contains("whitespace"));
    }

    #[test]
    fn quotes_are_cut() {
        assert_eq!(Quoted("w").to_string(), "\"w\"");
        assert_eq!(Quoted("a\nb").to_string(), "\"a\\nb\"");
        let long = "é".repeat(10_000); // 2 bytes a char: the cut falls on a boundary
        let q = Quoted(&long).to_string();
        assert!(q.len() < MAX_QUOTED_BYTES + 40, "{}", q.len());
        assert!(q.ends_with("… (20000 bytes)"), "{q}");
    }
}
