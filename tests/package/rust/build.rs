// Gives this crate's binaries the run path of libdefkv (found by defkv-sys through
// pkg-config), so they run without LD_LIBRARY_PATH.
fn main() {
    if let Ok(dir) = std::env::var("DEP_DEFKV_RS_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
