//! `uniffi-bindgen`, pinned to keepwire-ffi's UniFFI version.
//!
//! `cargo run -p uniffi-bindgen -- generate --library target/debug/libkeepwire_ffi.so
//! --language python --out-dir OUT` (also `kotlin`, `swift`). maturin finds this
//! binary in the workspace and runs it when it builds the Python package.
#![forbid(unsafe_code)]

fn main() {
    uniffi::uniffi_bindgen_main()
}
