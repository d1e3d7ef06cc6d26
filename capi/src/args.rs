//! Turning what C passes (pointers, lengths, integer codes) into Rust references, with a
//! `PARASYNC_STATUS_USAGE` error instead of undefined behaviour for what can be checked: null
//! pointers, misalignment, sizes that overflow, and buffers that overlap where Rust needs
//! them apart. What cannot be checked (a dangling pointer, a buffer shorter than its stated
//! length) stays the caller's contract, as in any C API.

use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// A handle, or a usage error naming `what` when it is null.
///
/// # Safety
/// `p` is null or points to a live `T` that nothing mutates for `'a`.
pub(crate) unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    aligned(p, what)?;
    // SAFETY: aligned (checked), and null or live by the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| Error::usage(format!("{what} is NULL")))
}

/// Checks that an output pointer is not null (it is written with [`write`]).
pub(crate) fn out<T>(p: *mut T, what: &str) -> Result<NonNull<T>> {
    aligned(p, what)?;
    NonNull::new(p).ok_or_else(|| Error::usage(format!("{what} is NULL")))
}

/// Like [`out`] for an output the caller may decline with NULL.
pub(crate) fn optional_out<T>(p: *mut T, what: &str) -> Result<Option<NonNull<T>>> {
    aligned(p, what)?;
    Ok(NonNull::new(p))
}

/// A usage error when `p` is not aligned for `T` (NULL is aligned).
fn aligned<T>(p: *const T, what: &str) -> Result<()> {
    let align = std::mem::align_of::<T>();
    match (p as usize).is_multiple_of(align) {
        true => Ok(()),
        false => Err(Error::usage(format!("{what} is not aligned to {align} bytes"))),
    }
}

/// Writes `value` through an output pointer checked by [`out`].
///
/// # Safety
/// `p` is valid for writing a `T` (its old contents are not read or dropped).
pub(crate) unsafe fn write<T>(p: NonNull<T>, value: T) {
    // SAFETY: the caller's contract.
    unsafe { p.as_ptr().write(value) }
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn string<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::usage(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|e| Error::usage(format!("{what} is not valid UTF-8: {e}")))
}

/// Checks what `from_raw_parts` needs that can be checked, and returns the pointer to use:
/// a dangling one for an empty slice given as NULL.
fn checked<T>(p: *const T, len: usize, what: &str) -> Result<*const T> {
    let size = std::mem::size_of::<T>();
    if len.checked_mul(size).is_none_or(|bytes| bytes > isize::MAX as usize) {
        return Err(Error::usage(format!("{what}: {len} elements of {size} bytes do not fit in memory")));
    }
    if p.is_null() {
        return match len {
            0 => Ok(NonNull::dangling().as_ptr()),
            _ => Err(Error::usage(format!("{what} is NULL but {len} elements were announced"))),
        };
    }
    aligned(p, what)?;
    Ok(p)
}

/// `len` elements at `p` (NULL is allowed when `len` is 0).
///
/// # Safety
/// Unless null, `p` points to `len` initialized elements that nothing mutates for `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    let p = checked(p, len, what)?;
    // SAFETY: non-null, aligned, size in range (checked), valid for `len` reads (contract).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `len` writable elements at `p` (NULL is allowed when `len` is 0).
///
/// # Safety
/// Unless null, `p` points to `len` initialized elements that nothing else reads or writes
/// for `'a` (overlaps between the buffers of one call are checked with [`disjoint`]).
pub(crate) unsafe fn slice_mut<'a, T>(p: *mut T, len: usize, what: &str) -> Result<&'a mut [T]> {
    let p = checked(p, len, what)?.cast_mut();
    // SAFETY: as in `slice`, and exclusive by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A buffer of one call, by address, for [`disjoint`].
pub(crate) struct Region {
    /// First byte.
    pub start: usize,
    /// Length in bytes.
    pub bytes: usize,
    /// Whether the call writes it (two read-only buffers may overlap).
    pub written: bool,
    /// How to name it in a message, such as `outs[2]`.
    pub name: String,
}

impl Region {
    /// The region of `len` elements at `p` (none at NULL: [`slice`] refuses that).
    pub(crate) fn of<T>(p: *const T, len: usize, written: bool, name: String) -> Region {
        let bytes = if p.is_null() { 0 } else { len.saturating_mul(std::mem::size_of::<T>()) };
        Region { start: p as usize, bytes, written, name }
    }
}

/// Fails, naming both (in the order given), when a written buffer overlaps another buffer of
/// the same call: Rust may not hold a `&mut` to memory that anything else refers to.
pub(crate) fn disjoint(regions: Vec<Region>) -> Result<()> {
    let mut by_address: Vec<(usize, &Region)> = regions.iter().enumerate().filter(|(_, r)| r.bytes > 0).collect();
    by_address.sort_by_key(|(_, r)| r.start);
    // Scanning in address order, compare each buffer with every earlier one still open.
    let mut open: Vec<(usize, &Region)> = Vec::new();
    for (i, r) in by_address {
        open.retain(|(_, o)| o.start + o.bytes > r.start);
        if let Some(&(j, o)) = open.iter().find(|(_, o)| o.written || r.written) {
            let (first, second) = if j < i { (o, r) } else { (r, o) };
            return Err(Error::usage(format!("{} and {} overlap in memory", first.name, second.name)));
        }
        open.push((i, r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ParasyncStatus;

    fn message(r: Result<impl Sized>) -> String {
        let e = r.err().expect("an error");
        assert_eq!(e.status(), ParasyncStatus::Usage);
        format!("{e:?}")
    }

    #[test]
    fn null_pointers_are_errors_unless_nothing_was_announced() {
        // SAFETY: null or valid pointers only.
        unsafe {
            assert!(message(slice::<f32>(std::ptr::null(), 3, "grads[1]")).contains("grads[1] is NULL but 3 elements"));
            assert_eq!(slice::<f32>(std::ptr::null(), 0, "grads[1]").unwrap().len(), 0);
            assert_eq!(slice_mut::<f64>(std::ptr::null_mut(), 0, "buf").unwrap().len(), 0);
            assert!(message(string(std::ptr::null(), "master")).contains("master is NULL"));
            assert!(message(handle::<u8>(std::ptr::null(), "client")).contains("client is NULL"));
            assert_eq!(string(c"127.0.0.1:1".as_ptr(), "master").unwrap(), "127.0.0.1:1");
            let bad = [0xffu8 as c_char, 0];
            assert!(message(string(bad.as_ptr(), "name")).contains("name is not valid UTF-8"));
        }
        assert!(message(out::<u32>(std::ptr::null_mut(), "out")).contains("out is NULL"));
    }

    #[test]
    fn misaligned_and_oversized_buffers_are_errors() {
        let words = [0u64; 2];
        let odd = (words.as_ptr() as *const u8).wrapping_add(4) as *const f64;
        // SAFETY: both are rejected before any read.
        unsafe {
            assert!(message(slice(odd, 1, "buf")).contains("buf is not aligned to 8 bytes"));
            assert!(message(slice(words.as_ptr(), usize::MAX / 4, "buf")).contains("do not fit in memory"));
            assert!(message(handle(odd, "client")).contains("client is not aligned to 8 bytes"));
        }
    }

    #[test]
    fn written_buffers_may_not_overlap_anything() {
        let r = |start, bytes, written, name: &str| Region { start, bytes, written, name: name.into() };
        assert!(disjoint(vec![r(0, 8, true, "a"), r(8, 8, true, "b"), r(100, 0, true, "empty")]).is_ok());
        assert!(disjoint(vec![r(0, 16, false, "g0"), r(4, 4, false, "g1")]).is_ok(), "reads may share");
        let e = message(disjoint(vec![r(40, 8, true, "outs[1]"), r(0, 64, false, "grads[0]"), r(100, 4, true, "outs[0]")]));
        assert!(e.contains("outs[1] and grads[0] overlap"), "{e}");
        // A long region still open past a short one.
        let e = message(disjoint(vec![r(0, 100, true, "x"), r(10, 2, false, "y"), r(50, 2, false, "z")]));
        assert!(e.contains("x and y overlap"), "{e}");
    }
}
