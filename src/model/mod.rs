//! The model: Llama-family decoder (Mistral, Qwen2/3 and Phi-3 as variants), its HF config, its
//! parameter layout and its weights on disk.

pub mod config;
pub mod hub;
pub mod layout;
pub mod llama;
pub mod weights;

pub use config::{Config, Family};
pub use llama::{param_specs, KvCache, Llama, ParamRole, ParamSpec};
pub use weights::{load_model, LoadedModel};

/// Compute dtype from a user-facing name.
pub fn parse_kind(name: &str) -> crate::Result<tch::Kind> {
    match name {
        "fp32" | "float32" | "f32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "fp16" | "float16" | "f16" => Ok(tch::Kind::Half),
        other => Err(crate::other!("unknown dtype `{other}` (expected fp32, bf16 or fp16)")),
    }
}

/// `auto` picks CUDA when libtorch sees a GPU.
pub fn parse_device(name: &str) -> crate::Result<tch::Device> {
    match name {
        "auto" => Ok(tch::Device::cuda_if_available()),
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(tch::Device::Cuda(0))
            } else {
                Err(crate::other!("--device cuda, but libtorch sees no GPU (built without the `cuda` feature?)"))
            }
        }
        other => Err(crate::other!("unknown device `{other}` (expected auto, cpu or cuda)")),
    }
}
