//! Finds the NIXL runtime and loads it before nixl-sys's stub needs it, so nobody sets
//! `LD_LIBRARY_PATH` by hand.
//!
//! nixl-sys (feature `stub-api`) calls `dlopen("libnixl_capi.so")` on its first call. The
//! dynamic loader answers a bare name with an object already loaded under that soname, so
//! loading the wheel's copy by absolute path first makes the stub use it; the library's
//! `$ORIGIN` rpath then finds libnixl, its UCX and its plugins beside it.

use super::error::NixlError;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Overrides the search: the directory holding `libnixl_capi.so`.
pub const LIB_DIR_ENV: &str = "KVFERRY_NIXL_LIB_DIR";
/// Where `.ci/install-nixl` unpacks the wheel's libraries, relative to `target/`.
const WHEEL_LIBS: &str = "nixl/.nixl_cu12.mesonpy.libs";
const CAPI: &str = "libnixl_capi.so";

static LOADED: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Loads the runtime once per process; later calls return the first answer.
pub fn preload() -> Result<PathBuf, NixlError> {
    LOADED
        .get_or_init(|| {
            let dir = find().ok_or_else(|| {
                format!(
                    "no {CAPI} in ${LIB_DIR_ENV} nor in a target/{WHEEL_LIBS} above the executable"
                )
            })?;
            load(&dir.join(CAPI))?;
            Ok(dir)
        })
        .clone()
        .map_err(NixlError::Runtime)
}

/// `$KVFERRY_NIXL_LIB_DIR`, else the first `target/nixl/...` in the executable's ancestors
/// (binaries live in `target/<profile>/`, test binaries in `target/<profile>/deps/`).
fn find() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(LIB_DIR_ENV) {
        return Some(PathBuf::from(dir)).filter(|d| d.join(CAPI).is_file());
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).find_map(|a| {
        [a.join(WHEEL_LIBS), a.join("target").join(WHEEL_LIBS)]
            .into_iter()
            .find(|d| d.join(CAPI).is_file())
    })
}

fn load(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().to_string_lossy().as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: a valid C string; the handle is kept for the life of the process on purpose
    // (the stub holds function pointers into the library).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, owned by libc until the next dl call.
            unsafe { std::ffi::CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("dlopen {}: {why}", path.display()));
    }
    Ok(())
}
