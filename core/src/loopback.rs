//! In-memory agent and transport for tests: no threads, no sockets; the test pumps them.
