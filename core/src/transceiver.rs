//! The per-rank transceiver.
