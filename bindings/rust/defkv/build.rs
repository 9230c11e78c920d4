// Binaries of this crate (tests, examples) need the rpath of libdefkv too; defkv-sys forwards
// the directory it was given (DEFKV_LIB_DIR) as DEP_DEFKV_LIB_DIR.
fn main() {
    println!("cargo:rerun-if-env-changed=DEFKV_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_DEFKV_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
