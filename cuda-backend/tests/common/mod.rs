//! Shared by the GPU tests.

use kvferry_backends::cuda::probe;

/// The CUDA devices, or `None` after printing why the test skips (no driver, no device).
pub fn gpus() -> Option<usize> {
    match probe() {
        Ok(n) => Some(n),
        Err(e) => {
            println!("skipping: {e}");
            None
        }
    }
}
