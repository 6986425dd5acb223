//! A ctx or gen instance (all its TP ranks, one process) embedded in another program (the
//! Python package in `cuda-backend/python`): the node's own machinery — connections
//! (`ctx::accept_loop`, one listener per rank; `gen::dial_loop`), `Instance`'s completion step
//! and the host agent — driven by the program's commands instead of `Prepare` frames, over KV
//! memory the program lends (`HostKv::lent`, one pool per rank).
//!
//! `handle` is the program's side: it starts the driver on a thread of its own and talks to it
//! through a bounded command queue (`command`); terminal statuses come back through `outcomes`.
//! A context request hands the program a `ticket` (the context parameters the serving layer
//! passes to the generation side); `driver` runs the loop for both sides, `dialers` the
//! generation side's connections (every local rank to every rank of the context instances it
//! reads from).

pub mod command;
pub mod dialers;
pub mod driver;
pub mod handle;
pub mod outcomes;
pub mod ticket;
