//! Large buffers on transparent huge pages.
//!
//! A 64 MiB tensor on 4 KiB pages spans 16 384 pages: every pass over it walks that many
//! TLB entries, and every kernel copy into or out of it (a socket receive, a
//! `process_vm_readv`) looks up and pins it page by page. On 2 MiB pages the same tensor is
//! 32 pages. Linux hands out huge pages to ranges marked `MADV_HUGEPAGE` (the default
//! `madvise` setting of `/sys/kernel/mm/transparent_hugepage/enabled`) when they are first
//! touched. NumPy marks its arrays of 4 MiB or more the same way.

/// Buffers smaller than this stay on ordinary pages (as NumPy does).
const MIN_BYTES: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the 2 MiB-aligned interior of `buf` with transparent huge pages,
/// if `buf` is at least 4 MiB. Pages not yet touched get huge pages when first written;
/// pages already present may be merged later by the kernel's background collapse. Only
/// advice: the contents are untouched, and nothing happens off Linux or when the kernel
/// declines.
pub fn advise_huge_pages<T>(buf: &mut [T]) {
    advise_range(buf.as_mut_ptr() as usize, std::mem::size_of_val(buf));
}

fn advise_range(start: usize, len: usize) {
    if len < MIN_BYTES {
        return;
    }
    let first = start.next_multiple_of(HUGE_PAGE);
    let end = (start + len) & !(HUGE_PAGE - 1);
    if end <= first {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: madvise only changes how the kernel backs this range of the caller's own
    // allocation; it reads and writes no memory. Failure (EINVAL where THP is compiled out)
    // is harmless: the range stays on ordinary pages.
    unsafe {
        libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
    }
}

/// A vector of `n` copies of `value`, marked for huge pages (see [`advise_huge_pages`])
/// before its memory is first written, so that a large one gets huge pages at once.
pub fn filled_vec<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_range(v.as_mut_ptr() as usize, n * std::mem::size_of::<T>());
    v.resize(n, value);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_vec_holds_the_values() {
        for n in [0, 1, 1000, (5 << 20) / 4 + 3] {
            let v = filled_vec(n, 1.5f32);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 1.5));
        }
    }

    /// A large vector really is backed by huge pages where the kernel offers them
    /// (`enabled` set to `always` or `madvise`, faults allowed to compact); elsewhere the
    /// test says so and checks only the values.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_vectors_get_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let v = filled_vec(16 << 20, 7u8);
        assert!(v.iter().all(|&b| b == 7));
        if !(mode.contains("[always]") || mode.contains("[madvise]")) {
            eprintln!("transparent huge pages are off here ({}); not checked", mode.trim());
            return;
        }
        let (start, end) = (v.as_ptr() as usize, v.as_ptr() as usize + v.len());
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut huge_kib = 0u64;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                        // madvise splits the mapping: sum over every piece that overlaps
                        in_range = lo < end && start < hi;
                        continue;
                    }
                }
            }
            if in_range {
                if let Some(rest) = line.strip_prefix("AnonHugePages:") {
                    huge_kib += rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
                }
            }
        }
        eprintln!("16 MiB vector: {huge_kib} KiB on huge pages");
        assert!(huge_kib <= 16 << 10);
        // With `defrag` at `always`, `madvise` or `defer+madvise`, a fault in an advised
        // range compacts memory to find a free 2 MiB block rather than fall back at once.
        let defrag = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/defrag").unwrap_or_default();
        if ["[always]", "[madvise]", "[defer+madvise]"].iter().any(|m| defrag.contains(m)) {
            assert!(huge_kib > 0, "no huge pages for an advised 16 MiB vector (defrag: {})", defrag.trim());
        }
        drop(v);
    }
}
