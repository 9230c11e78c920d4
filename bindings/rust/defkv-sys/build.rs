// Finds libdefkv: DEFKV_LIB_DIR (a directory holding libdefkv.so) if set, else pkg-config
// (`defkv.pc`; set PKG_CONFIG_PATH=<prefix>/lib/pkgconfig for a non-standard prefix).
// The library directory is passed on to dependents as DEP_DEFKV_LIB_DIR (the `defkv` crate
// forwards it as DEP_DEFKV_RS_LIB_DIR to its own dependents, for their run path); binaries of
// this crate get it as their run path directly.
fn main() {
    println!("cargo:rerun-if-env-changed=DEFKV_LIB_DIR");
    let dir = match std::env::var("DEFKV_LIB_DIR") {
        Ok(dir) if !dir.is_empty() => {
            println!("cargo:rustc-link-search=native={dir}");
            println!("cargo:rustc-link-lib=dylib=defkv");
            Some(dir)
        }
        _ => match pkg_config::Config::new().atleast_version("0.2").probe("defkv") {
            // pkg-config prints the link flags; it leaves out -L for system directories, which
            // need no run path.
            // (A relocatable defkv.pc gives <prefix>/lib/pkgconfig/../../lib: canonicalized.)
            Ok(lib) => lib.link_paths.first().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()).display().to_string()),
            Err(e) => {
                println!(
                    "cargo:warning=defkv-sys: libdefkv not found through pkg-config ({e}); set \
                     PKG_CONFIG_PATH=<prefix>/lib/pkgconfig or DEFKV_LIB_DIR=<dir of libdefkv.so>"
                );
                println!("cargo:rustc-link-lib=dylib=defkv");
                None
            }
        },
    };
    if let Some(dir) = dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:lib_dir={dir}");
    }
}
