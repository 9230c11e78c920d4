// Finds libdefkv: DEFKV_LIB_DIR (set by CTest to the build tree's capi/ directory) or the
// system's library path. The directory is passed on to dependents as DEP_DEFKV_LIB_DIR.
fn main() {
    println!("cargo:rerun-if-env-changed=DEFKV_LIB_DIR");
    if let Ok(dir) = std::env::var("DEFKV_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:lib_dir={dir}");
    }
    println!("cargo:rustc-link-lib=dylib=defkv");
}
