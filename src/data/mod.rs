//! Data: dataset files to records, tokenization, batching and loaders.

pub mod batch;
pub mod formats;
pub mod jinja;
pub mod loader;
mod parquet;
pub mod template;
pub mod tokenizer;

pub use batch::{collate, tokenize, tokenize_all, Batch, Example, Overflow};
pub use formats::{read_records, Record};
pub use template::{Template, TemplateKind};
pub use tokenizer::Tokenizer;
