//! The checked-in bindings must equal what Debian's bindgen makes of the current header.
use std::path::PathBuf;
use std::process::Command;

#[test]
fn checked_in_bindings_match_regenerated() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("defkv-sys-bindings-{}.rs", std::process::id()));
    let status = Command::new(dir.join("regen.sh")).arg(&out).status();
    let status = match status {
        Ok(s) => s,
        Err(e) => panic!("could not run regen.sh (is Debian's bindgen installed?): {e}"),
    };
    assert!(status.success(), "regen.sh failed: {status}");
    let fresh = std::fs::read_to_string(&out).expect("regenerated bindings");
    let _ = std::fs::remove_file(&out);
    let checked_in = std::fs::read_to_string(dir.join("src/bindings.rs")).expect("src/bindings.rs");
    assert!(
        fresh == checked_in,
        "src/bindings.rs is stale: the header changed; run bindings/rust/defkv-sys/regen.sh and commit"
    );
}

#[test]
fn links_and_reports_version() {
    let v = unsafe { defkv_sys::defkv_version_number() };
    assert_eq!(v, defkv_sys::DEFKV_VERSION_NUMBER);
}
