//! Forced migration: the pure planner and state machines, and the engine
//! that carries out durable jobs.

pub mod engine;
pub mod plan;
