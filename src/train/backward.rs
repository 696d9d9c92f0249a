//! Forward and backward passes that deliver per-parameter gradients as they are produced, layer
//! by layer from the top, so that a bucket's reduction can start while the layers below are still
//! being differentiated.
//!
//! tch has neither autograd hooks nor activation checkpointing, so backward runs in segments: the
//! head and loss, then each layer from the last down, each segment a `run_backward` of the
//! surrogate `⟨y, g_out⟩` (whose gradient w.r.t. `y` is exactly `g_out`) for the layer's weights
//! and its input. Two ways to get a layer's graph:
//! * *kept* (plain executor): one forward with the graph kept; each segment walks the stored
//!   graph of its layer down to the layer's input and frees it, as one whole `run_backward` would;
//! * *recomputed* (`train.recompute`, required by ZeRO-3): the forward runs under `no_grad` keeping
//!   only each layer's input; each segment recomputes its layer with the graph on.
//!
//! A layer's gradients are complete right after its segment, which is when the sink starts their
//! reduction and when ZeRO-3 releases the layer's gathered weights. Gathered weights (ZeRO-3, the
//! gathered teacher, the AutoLR probe model) are prefetched one layer ahead: the gather of the
//! next layer runs while this one computes, so at most two gathered layers exist at a time.
//!
//! `run_backward` returns gradients without touching `.grad`, so the forget and retain losses get
//! separate gradients with no bookkeeping.

use std::collections::HashSet;

use tch::{Kind, Tensor};

use super::params::{self, LayerGather, PendingGathers};
use crate::data::Batch;
use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::model::Llama;
use crate::Result;

/// Where a model's trainable weights come from during a pass.
pub enum Weights<'a> {
    /// Already bound to the model (resident flat buffer).
    Resident,
    /// Bound to the model, with the all-gathers of the last update still arriving in the buffer
    /// (`dist.overlap`): a layer waits for its own buckets just before it first runs.
    Arriving(&'a mut PendingGathers),
    /// Gathered layer by layer from this rank's fp32 shard, cast to `kind`.
    Gathered { comm: &'a dyn Collective, shard: &'a Tensor, kind: Kind },
}

/// Receives gradients as backward produces them.
pub trait GradSink {
    /// Gradient of trainable parameter `param` (index into the layout) for this pass.
    fn add(&mut self, param: usize, grad: &Tensor) -> Result<()>;
    /// Every gradient of `bucket` for this pass has been delivered.
    fn bucket_done(&mut self, bucket: usize) -> Result<()>;
    /// Every gradient of `layer` for this pass has been delivered.
    fn layer_done(&mut self, layer: Option<usize>) -> Result<()>;
}

/// Binds a pass's layers in turn, gathering gathered weights one layer ahead.
struct Binder<'w, 'a> {
    w: &'w mut Weights<'a>,
    layout: &'w FlatLayout,
    /// The layer whose gather is in flight.
    ahead: Option<LayerGather>,
    bound: HashSet<Option<usize>>,
}

impl<'w, 'a> Binder<'w, 'a> {
    fn new(w: &'w mut Weights<'a>, layout: &'w FlatLayout) -> Self {
        Binder { w, layout, ahead: None, bound: HashSet::new() }
    }

    fn gathered(&self) -> bool {
        matches!(self.w, Weights::Gathered { .. })
    }

    fn start(&self, model: &Llama, layer: Option<usize>) -> Result<Option<LayerGather>> {
        match &*self.w {
            Weights::Gathered { comm, shard, kind } => params::start_gather(model.device(), self.layout, *comm, shard, layer, *kind),
            Weights::Resident | Weights::Arriving(_) => Ok(None),
        }
    }

    /// Start gathering `layer` while the current one computes.
    fn prefetch(&mut self, model: &Llama, layer: Option<usize>) -> Result<()> {
        if self.gathered() && !self.bound.contains(&layer) && self.ahead.as_ref().is_none_or(|g| g.layer != layer) {
            debug_assert!(self.ahead.is_none(), "one layer prefetched at a time");
            self.ahead = self.start(model, layer)?;
        }
        Ok(())
    }

    /// Make `layer`'s weights available (waiting for its prefetch or its post-update gather, or
    /// gathering it now).
    fn bind(&mut self, model: &mut Llama, layer: Option<usize>, grad: bool) -> Result<()> {
        if let Weights::Arriving(pending) = &mut *self.w {
            return pending.wait_layer(layer);
        }
        if !self.gathered() || !self.bound.insert(layer) {
            return Ok(());
        }
        let gather = match self.ahead.take() {
            Some(g) if g.layer == layer => Some(g),
            other => {
                self.ahead = other;
                self.start(model, layer)?
            }
        };
        if let Some(g) = gather {
            g.bind(model, self.layout, grad)?;
        }
        Ok(())
    }

    /// Free a gathered layer's buffer.
    fn release(&mut self, model: &mut Llama, layer: Option<usize>) {
        if self.gathered() && self.bound.remove(&layer) {
            params::release(model, self.layout, layer);
        }
    }

    /// Wait for a prefetch nobody used (a collective must never be left in flight).
    fn finish(&mut self) -> Result<()> {
        if let Some(g) = self.ahead.take() {
            g.discard()?;
        }
        Ok(())
    }
}

/// Logits of a batch without grad (teacher, probes, reference log-likelihoods).
pub fn forward_logits(model: &mut Llama, layout: &FlatLayout, w: &mut Weights, batch: &Batch) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    if matches!(w, Weights::Resident) {
        return Ok(model.forward(&batch.input_ids, Some(&batch.attention_mask), None));
    }
    let (b, t) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
    let ctx = model.attn_ctx(t, 0, Some(&batch.attention_mask), None, b);
    let n_layers = model.num_layers();
    let mut binder = Binder::new(w, layout);
    binder.bind(model, None, false)?;
    binder.prefetch(model, Some(0))?;
    let mut x = model.embed(&batch.input_ids);
    for l in 0..n_layers {
        binder.bind(model, Some(l), false)?;
        if l + 1 < n_layers {
            binder.prefetch(model, Some(l + 1))?;
        }
        x = model.layer_forward(l, &x, &ctx);
        binder.release(model, Some(l));
    }
    let logits = model.head(&x);
    binder.release(model, None);
    binder.finish()?;
    Ok(logits)
}

/// Forward `batch`, apply `loss_fn` to the logits, and deliver the gradients of the resulting
/// scalar to `sink`, layer by layer from the top. Recomputes each layer in backward when
/// `recompute` (required for gathered weights).
pub fn forward_backward(
    model: &mut Llama,
    layout: &FlatLayout,
    w: &mut Weights,
    recompute: bool,
    batch: &Batch,
    loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn GradSink,
) -> Result<()> {
    let mut binder = Binder::new(w, layout);
    debug_assert!(recompute || !binder.gathered(), "gathered weights are recomputed layer by layer");
    let (b, t) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
    let ctx = model.attn_ctx(t, 0, Some(&batch.attention_mask), None, b);
    let n_layers = model.num_layers();
    let embed_trainable =
        params::trainable(model, layout, Some(None)).iter().any(|(i, _)| layout.params[*i].name == "model.embed_tokens.weight");

    // Forward. Kept: xs[l] is layer l's input with its graph (xs[n] the last output). Recomputed:
    // the same values without graph.
    binder.bind(model, None, true)?;
    binder.prefetch(model, Some(0))?;
    let mut xs: Vec<Option<Tensor>> = Vec::with_capacity(n_layers + 1);
    let forward = |model: &Llama, xs: &mut Vec<Option<Tensor>>, l: Option<usize>| {
        let y = match l {
            None => model.embed(&batch.input_ids),
            Some(l) => model.layer_forward(l, xs[l].as_ref().expect("layer input"), &ctx),
        };
        xs.push(Some(y));
    };
    for l in std::iter::once(None).chain((0..n_layers).map(Some)) {
        if let Some(l) = l {
            binder.bind(model, Some(l), true)?;
            // The next layer in order; after the last one, the first that backward recomputes
            // (the last layer itself stays bound).
            let next = if l + 1 < n_layers { Some(l + 1) } else { l.checked_sub(1) };
            if let Some(n) = next {
                binder.prefetch(model, Some(n))?;
            }
        }
        if recompute {
            tch::no_grad(|| forward(model, &mut xs, l));
        } else {
            forward(model, &mut xs, l);
        }
        if let Some(l) = l.filter(|&l| l + 1 < n_layers) {
            binder.release(model, Some(l));
        }
    }

    // Head and loss, differentiated w.r.t. the final hidden state and the head's own weights.
    // The head is its own segment on a detached copy of the final hidden state: differentiating
    // the loss for a tied (trainable) embedding would otherwise walk the kept graph of every layer
    // down to the lookup, freeing it before the layer segments and counting the lookup twice.
    let top = xs[n_layers].take().expect("final hidden state");
    let h = top.detach().set_requires_grad(true);
    let loss = {
        let logits = model.head(&h);
        loss_fn(&logits)?
    };
    let head_params: Vec<(usize, Tensor)> = params::trainable(model, layout, Some(None))
        .into_iter()
        .filter(|(i, _)| layout.params[*i].name != "model.embed_tokens.weight" || model.config().tie_word_embeddings)
        .collect();
    let mut inputs: Vec<&Tensor> = vec![&h];
    inputs.extend(head_params.iter().map(|(_, t)| t));
    let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?;
    let mut g_out = grads[0].shallow_clone();
    for ((i, _), g) in head_params.iter().zip(&grads[1..]) {
        sink.add(*i, g)?;
    }
    drop((loss, grads, inputs));

    // Layers from the top: the kept graph continues from the last layer's real output.
    let mut y_top = Some(top);
    for l in (0..n_layers).rev() {
        binder.bind(model, Some(l), true)?;
        if l > 0 {
            binder.prefetch(model, Some(l - 1))?;
        }
        let layer_params = params::trainable(model, layout, Some(Some(l)));
        let (x_in, y) = if recompute {
            let x_in = xs[l].take().expect("layer input").detach().set_requires_grad(true);
            let y = model.layer_forward(l, &x_in, &ctx);
            (x_in, y)
        } else {
            let y = y_top.take().expect("layer output with graph");
            (xs[l].take().expect("layer input"), y)
        };
        // Layer 0's input is the embedding lookup: it needs a gradient only to reach a trainable
        // embedding, which the kept graph reaches through it and the recomputed one below.
        let want_input = x_in.requires_grad() && (l > 0 || embed_trainable);
        let surrogate = (&y * &g_out).sum(Kind::Float);
        let mut inputs: Vec<&Tensor> = vec![];
        if want_input {
            inputs.push(&x_in);
        }
        inputs.extend(layer_params.iter().map(|(_, t)| t));
        let grads = Tensor::f_run_backward(&[&surrogate], &inputs, false, false)?;
        let (g_in, g_params) = if want_input { (Some(&grads[0]), &grads[1..]) } else { (None, &grads[..]) };
        for ((i, _), g) in layer_params.iter().zip(g_params) {
            sink.add(*i, g)?;
        }
        sink.layer_done(Some(l))?;
        binder.release(model, Some(l));
        if let Some(g) = g_in {
            g_out = g.shallow_clone();
        }
        if !recompute {
            // The kept graph: this layer's input is the output of the one below (or, for layer
            // 0, the lookup a trainable embedding is differentiated through).
            y_top = Some(x_in);
        }
    }

    // A trainable embedding gets its gradient through the lookup (tied or not: a tied one also
    // got the head's gradient above).
    if embed_trainable {
        let embed: Vec<(usize, Tensor)> = params::trainable(model, layout, Some(None))
            .into_iter()
            .filter(|(i, _)| layout.params[*i].name == "model.embed_tokens.weight")
            .collect();
        for (i, e) in &embed {
            let x0 =
                if recompute { Tensor::embedding(e, &batch.input_ids, -1, false, false) } else { y_top.take().expect("embedding output") };
            let surrogate = (x0 * &g_out).sum(Kind::Float);
            let g = Tensor::f_run_backward(&[&surrogate], &[e], false, false)?;
            sink.add(*i, &g[0])?;
        }
    }
    if layout.layers().contains(&None) {
        sink.layer_done(None)?;
    }
    binder.release(model, None);
    binder.finish()
}
