//! kvferry backends: the host-memory TCP node (always built) and the CUDA agent (feature `cuda`).
