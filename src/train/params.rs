//! Binding a model's trainable weights to flat buffers.
//!
//! *Resident* (ZeRO 0–2): the trainable weights are views into one flat buffer of the compute
//! dtype; writing the buffer (after an all-gather) updates the model in place.
//! *Gathered* (ZeRO-3, and the teacher with `dist.teacher = "gather"`): a layer's weights are
//! all-gathered from the shards into a layer-sized buffer right before the layer runs and
//! released right after, so no rank ever holds more than one layer beyond its shard.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::model::Llama;
use crate::Result;

/// This rank's fp32 master shard, read from the model directory's safetensors (converted to
/// fp32 per parameter, one parameter at a time).
pub fn master_shard(model_dir: &std::path::Path, layout: &FlatLayout, rank: usize, device: tch::Device) -> Result<Tensor> {
    let ckpt = crate::model::weights::Checkpoint::open(model_dir)?;
    let master = Tensor::zeros([layout.shard_len()], (Kind::Float, device));
    let mut current: Option<(String, Tensor)> = None;
    for seg in layout.segments(rank) {
        if current.as_ref().map(|c| c.0.as_str()) != Some(seg.param.as_str()) {
            let t = ckpt.tensor(&seg.param, None)?.to_kind(Kind::Float).reshape([-1]);
            current = Some((seg.param.clone(), t));
        }
        let (_, t) = current.as_ref().expect("current parameter");
        tch::no_grad(|| master.narrow(0, seg.shard_offset, seg.len).copy_(&t.narrow(0, seg.param_offset, seg.len)));
    }
    Ok(master)
}

/// Name → index into `layout.params`.
pub fn param_index(layout: &FlatLayout) -> HashMap<String, usize> {
    layout.params.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect()
}

/// Move the model's trainable weights into a new full flat buffer of `kind` and make them views
/// of it (leaves requiring grad when `grad`). Each weight is copied and rebound in turn, so the
/// original tensors are freed one by one and the model never exists twice in memory.
pub fn flatten_and_bind(model: &mut Llama, layout: &FlatLayout, kind: Kind, grad: bool) -> Tensor {
    let index = param_index(layout);
    let full = Tensor::zeros([layout.total], (kind, model.device()));
    tch::no_grad(|| {
        model.visit_params_mut(|name, t| {
            if let Some(&i) = index.get(name) {
                let p = &layout.params[i];
                let mut slot = full.narrow(0, p.offset, p.numel);
                slot.copy_(&t.reshape([-1]));
                let v = slot.view(p.shape.as_slice()).detach();
                *t = if grad { v.set_requires_grad(true) } else { v };
            }
        })
    });
    full
}

/// Make the model's trainable weights views into `full` (elements from `base` on), as leaves that
/// require grad when `grad` is set; other weights are untouched.
pub fn bind(model: &mut Llama, layout: &FlatLayout, full: &Tensor, base: i64, layer: Option<Option<usize>>, grad: bool) {
    let index = param_index(layout);
    let mut visit = |name: &str, t: &mut Tensor| {
        if let Some(&i) = index.get(name) {
            let p = &layout.params[i];
            let v = full.narrow(0, p.offset - base, p.numel).view(p.shape.as_slice()).detach();
            *t = if grad { v.set_requires_grad(true) } else { v };
        }
    };
    match layer {
        None => model.visit_params_mut(&mut visit),
        Some(l) => model.visit_layer_params_mut(l, &mut visit),
    }
}

/// Gather `layer`'s weights from the fp32 `shard` into a fresh layer buffer of `kind` and bind.
pub fn bind_gathered(
    model: &mut Llama,
    layout: &FlatLayout,
    comm: &dyn Collective,
    shard: &Tensor,
    layer: Option<usize>,
    kind: Kind,
    grad: bool,
) -> Result<()> {
    let buckets = layout.layer_buckets(layer);
    if buckets.is_empty() {
        return Ok(());
    }
    let (base, len) = layout.span(&buckets);
    let mut buf = Tensor::zeros([len], (kind, model.device()));
    layout.gather_buckets(comm, shard, &mut buf, &buckets, base)?;
    bind(model, layout, &buf, base, Some(layer), grad);
    Ok(())
}

/// Drop a gathered layer's weights (replace them by empty tensors) to free its buffer.
pub fn release(model: &mut Llama, layout: &FlatLayout, layer: Option<usize>) {
    let index = param_index(layout);
    let dev = model.device();
    let kind = model.kind();
    model.visit_layer_params_mut(layer, |name, t| {
        if index.contains_key(name) {
            *t = Tensor::empty([0], (kind, dev));
        }
    });
}

/// The trainable weights of `layer` (or of the whole model) with their indices in the layout.
pub fn trainable(model: &mut Llama, layout: &FlatLayout, layer: Option<Option<usize>>) -> Vec<(usize, Tensor)> {
    let index = param_index(layout);
    let mut out = vec![];
    let mut visit = |name: &str, t: &mut Tensor| {
        if let Some(&i) = index.get(name) {
            out.push((i, t.shallow_clone()));
        }
    };
    match layer {
        None => model.visit_params_mut(&mut visit),
        Some(l) => model.visit_layer_params_mut(l, &mut visit),
    }
    out
}
