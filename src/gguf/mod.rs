//! GGUF, llama.cpp's single-file model format, brought into the HF layout the rest of the program
//! reads: `reader` (header, metadata, tensors, dequantization), `tokenizer` (the vocabulary and
//! merges in the metadata as `tokenizer.json`) and `import` (the whole model directory).
//!
//! Dependencies point one way: this module uses `model` (config, parameter list, the HF writer)
//! and `error`; `model` and `data` know nothing of GGUF.

pub mod import;
pub mod reader;
pub mod tokenizer;

pub use import::{import_gguf, ImportSummary};
pub use reader::GgufFile;
