//! What trains and how it is laid out over ranks, decided once here for the trainer and for
//! `unlearn plan` (which must count exactly the buffers the trainer allocates).

use crate::config::Trainable;
use crate::dist::zero::FlatLayout;
use crate::model::ParamSpec;
use crate::Result;

/// The parameters that train under `model.trainable`, in the model's order, chosen by the roles
/// the model's parameter layout (`model::layout`) gives them.
pub fn trainable_specs(specs: &[ParamSpec], trainable: Trainable) -> Vec<&ParamSpec> {
    specs.iter().filter(|s| trainable.includes(s.role)).collect()
}

/// Shards of the flat buffer: one under ZeRO-0 (every rank holds everything), else one per rank.
pub fn shard_count(zero: u8, world: usize) -> usize {
    if zero == 0 {
        1
    } else {
        world
    }
}

/// The flat layout of `trainable` at ZeRO stage `zero` over `world` ranks, in buckets of at most
/// `bucket_mb` MiB of fp32.
pub fn flat_layout(trainable: &[&ParamSpec], zero: u8, world: usize, bucket_mb: f64) -> FlatLayout {
    let bucket_elems = ((bucket_mb * 1024.0 * 1024.0) / 4.0).max(1.0) as i64;
    FlatLayout::new(trainable, shard_count(zero, world), bucket_elems)
}

/// Each rank takes an equal contiguous slice of every global micro-batch.
pub fn check_batch_split(batch_size: usize, world: usize, file: &str) -> Result<()> {
    if !batch_size.is_multiple_of(world) {
        return Err(crate::Error::config(
            file,
            "train.batch_size",
            format!("{batch_size} is not divisible by the number of ranks ({world})"),
        ));
    }
    Ok(())
}

/// The layer-wise executor runs with recompute, and always under ZeRO-3 (weights gathered per layer).
pub fn layer_wise(recompute: bool, zero: u8) -> bool {
    recompute || zero == 3
}
