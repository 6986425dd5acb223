//! kvferry-sim
