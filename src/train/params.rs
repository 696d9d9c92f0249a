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

/// A layer's weights being all-gathered into a fresh buffer of the compute dtype.
pub struct LayerGather {
    pub layer: Option<usize>,
    buf: Tensor,
    base: i64,
    handles: Vec<crate::dist::Handle>,
}

/// Start gathering `layer`'s weights from the fp32 `shard` into a layer buffer of `kind` (None
/// when the layer has no trainable weights).
pub fn start_gather(
    device: tch::Device,
    layout: &FlatLayout,
    comm: &dyn Collective,
    shard: &Tensor,
    layer: Option<usize>,
    kind: Kind,
) -> Result<Option<LayerGather>> {
    let buckets = layout.layer_buckets(layer);
    if buckets.is_empty() {
        return Ok(None);
    }
    let (base, len) = layout.span(&buckets);
    let buf = Tensor::zeros([len], (kind, device));
    let handles = layout.start_gather_buckets(comm, shard, &buf, &buckets, base)?;
    Ok(Some(LayerGather { layer, buf, base, handles }))
}

impl LayerGather {
    /// Wait for the gather and make the layer's trainable weights views of its buffer.
    pub fn bind(self, model: &mut Llama, layout: &FlatLayout, grad: bool) -> Result<()> {
        crate::dist::wait_all(self.handles)?;
        bind(model, layout, &self.buf, self.base, Some(self.layer), grad);
        Ok(())
    }

    /// Wait for the gather and drop its buffer unused.
    pub fn discard(self) -> Result<()> {
        crate::dist::wait_all(self.handles)
    }
}

/// The all-gathers of a resident replica issued after an update (`dist.overlap`), per layer in the
/// order a forward reads them, so that the next forward waits for each layer's buckets only just
/// before the layer runs. Whoever reads the replica outside a pass waits for them all first
/// ([`PendingGathers::wait_all`]); the shards they read must not be written before that.
#[derive(Default)]
pub struct PendingGathers {
    layers: Vec<(Option<usize>, Vec<crate::dist::Handle>)>,
}

impl PendingGathers {
    /// Start gathering every bucket of the fp32 `shard` into the replica `full`, layer by layer in
    /// forward order (embeddings and head first: the forward binds them before layer 0).
    pub fn start(layout: &FlatLayout, comm: &dyn Collective, shard: &Tensor, full: &Tensor) -> Result<Self> {
        let mut order = layout.layers();
        order.sort_by_key(|l| l.map_or(0, |l| l + 1));
        let mut layers = vec![];
        for layer in order {
            let handles = tch::no_grad(|| layout.start_gather_buckets(comm, shard, full, &layout.layer_buckets(layer), 0))?;
            layers.push((layer, handles));
        }
        Ok(PendingGathers { layers })
    }

    /// Wait for `layer`'s buckets (nothing when they have arrived).
    pub fn wait_layer(&mut self, layer: Option<usize>) -> Result<()> {
        match self.layers.iter().position(|(l, _)| *l == layer) {
            Some(i) => crate::dist::wait_all(self.layers.remove(i).1),
            None => Ok(()),
        }
    }

    /// Wait for every bucket still in flight (all of them, even after an error).
    pub fn wait_all(&mut self) -> Result<()> {
        crate::dist::wait_all(std::mem::take(&mut self.layers).into_iter().flat_map(|(_, h)| h))
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
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
