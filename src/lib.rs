//! `unlearn`: make a Llama-family language model forget a chosen forget set while keeping what it
//! should know, data-parallel across MPI ranks, and ship the result as a verified ONNX artifact.
//!
//! Layout (see ARCHITECTURE.md): `model` knows nothing of ranks or methods; `methods` turn
//! forget/retain batches into gradients and know nothing of reduction; `dist` moves flat buffers and
//! knows nothing of methods; `train` is where the three meet.

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod export;
pub mod fault;
pub mod files;
pub mod gguf;
pub mod logging;
pub mod methods;
pub mod model;
pub mod monitor;
pub mod optim;
pub mod plan;
pub mod progress;
pub mod record;
pub mod signals;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};
