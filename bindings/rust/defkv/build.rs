// Binaries of this crate (tests, examples) need the run path of libdefkv too: defkv-sys
// forwards the directory it found as DEP_DEFKV_LIB_DIR. It is passed on to this crate's
// dependents as DEP_DEFKV_RS_LIB_DIR (cargo gives a build script the metadata of its direct
// dependencies only, and a link argument applies to the emitting package's own targets only).
fn main() {
    if let Ok(dir) = std::env::var("DEP_DEFKV_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:lib_dir={dir}");
    }
}
