//! The checked-in `include/parasync.h` must be what cbindgen makes of `src/` with
//! `cbindgen.toml`; `PARASYNC_BLESS_HEADER=1` rewrites it instead of failing.

use std::path::Path;

fn generated() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("reading cbindgen.toml");
    // From the sources directly (no `cargo metadata`): the crate's C items are all in src/.
    let bindings = cbindgen::Builder::new()
        .with_src(dir.join("src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

#[test]
fn the_checked_in_header_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/parasync.h");
    let fresh = generated();
    if std::env::var_os("PARASYNC_BLESS_HEADER").is_some() {
        std::fs::write(&path, &fresh).expect("writing include/parasync.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != fresh {
        let first = checked_in.lines().zip(fresh.lines()).position(|(a, b)| a != b).unwrap_or(checked_in.lines().count().min(fresh.lines().count()));
        panic!(
            "{} is out of date with capi/src (first difference at line {}: {:?} checked in, {:?} generated).\n\
             Rerun with PARASYNC_BLESS_HEADER=1 to rewrite it: PARASYNC_BLESS_HEADER=1 cargo test -p parasync-capi --test header",
            path.display(),
            first + 1,
            checked_in.lines().nth(first).unwrap_or("<end>"),
            fresh.lines().nth(first).unwrap_or("<end>"),
        );
    }
}

#[test]
fn every_status_name_is_a_constant_of_the_header() {
    let header = generated();
    for code in 0..=16u32 {
        // SAFETY: parasync_status_name returns a static NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(parasync::parasync_status_name(code)) }.to_str().unwrap();
        assert!(header.contains(&format!("  {name} = {code},")), "{name} = {code} is not in the header");
    }
}
