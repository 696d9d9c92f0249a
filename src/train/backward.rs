//! Forward and backward passes that deliver per-parameter gradients as they are produced.
//!
//! tch has neither autograd hooks nor activation checkpointing, so two executors:
//! * *plain*: one forward with the graph kept, then `run_backward` for all trainable weights at
//!   once (fast; every gradient exists at the same time);
//! * *layer-wise*: a forward under `no_grad` keeping only each layer's input, then, from the last
//!   layer down, recompute the layer with the graph on and take its vector–Jacobian product
//!   through the surrogate `⟨y, g_out⟩`. A layer's gradients are complete right after its VJP,
//!   which is when the trainer reduce-scatters them (ZeRO-2) and when ZeRO-3 releases the layer's
//!   gathered weights. Same gradients as the plain pass (the surrogate's gradient w.r.t. y is
//!   exactly g_out).
//!
//! `run_backward` returns gradients without touching `.grad`, so the forget and retain losses get
//! separate gradients with no bookkeeping.

use tch::{Kind, Tensor};

use super::params;
use crate::data::Batch;
use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::model::Llama;
use crate::Result;

/// Where a model's trainable weights come from during a pass.
pub enum Weights<'a> {
    /// Already bound to the model (resident flat buffer).
    Resident,
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

fn bind(model: &mut Llama, layout: &FlatLayout, w: &Weights, layer: Option<usize>, grad: bool) -> Result<()> {
    if let Weights::Gathered { comm, shard, kind } = w {
        params::bind_gathered(model, layout, *comm, shard, layer, *kind, grad)?;
    }
    Ok(())
}

fn release(model: &mut Llama, layout: &FlatLayout, w: &Weights, layer: Option<usize>) {
    if matches!(w, Weights::Gathered { .. }) {
        params::release(model, layout, layer);
    }
}

/// Logits of a batch without grad (teacher, probes, reference log-likelihoods).
pub fn forward_logits(model: &mut Llama, layout: &FlatLayout, w: &Weights, batch: &Batch) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    if matches!(w, Weights::Resident) {
        return Ok(model.forward(&batch.input_ids, Some(&batch.attention_mask), None));
    }
    let (b, t) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
    let ctx = model.attn_ctx(t, 0, Some(&batch.attention_mask), None, b);
    bind(model, layout, w, None, false)?;
    let mut x = model.embed(&batch.input_ids);
    for l in 0..model.num_layers() {
        bind(model, layout, w, Some(l), false)?;
        x = model.layer_forward(l, &x, &ctx);
        release(model, layout, w, Some(l));
    }
    let logits = model.head(&x);
    release(model, layout, w, None);
    Ok(logits)
}

/// Forward `batch`, apply `loss_fn` to the logits, and deliver the gradients of the resulting
/// scalar to `sink`. Layer-wise when `layer_wise` (required for gathered weights).
pub fn forward_backward(
    model: &mut Llama,
    layout: &FlatLayout,
    w: &Weights,
    layer_wise: bool,
    batch: &Batch,
    loss_fn: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    sink: &mut dyn GradSink,
) -> Result<()> {
    if !layer_wise && matches!(w, Weights::Resident) {
        let logits = model.forward(&batch.input_ids, Some(&batch.attention_mask), None);
        let loss = loss_fn(&logits)?;
        let trainable = params::trainable(model, layout, None);
        let inputs: Vec<&Tensor> = trainable.iter().map(|(_, t)| t).collect();
        let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?;
        drop((loss, inputs));
        // Hand gradients over bucket by bucket, dropping each once delivered, so a ZeRO-2 sink
        // holds one bucket buffer at a time (the gradients themselves all exist at once here;
        // that is the plain executor's price).
        let slot: std::collections::HashMap<usize, usize> = trainable.iter().enumerate().map(|(k, (i, _))| (*i, k)).collect();
        let mut grads: Vec<Option<Tensor>> = grads.into_iter().map(Some).collect();
        for (b, bucket) in layout.buckets.iter().enumerate() {
            for i in bucket.params.clone() {
                let g = grads[slot[&i]].take().expect("each gradient delivered once");
                sink.add(i, &g)?;
            }
            sink.bucket_done(b)?;
        }
        return Ok(());
    }

    let (b, t) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
    let ctx = model.attn_ctx(t, 0, Some(&batch.attention_mask), None, b);
    let n_layers = model.num_layers();
    // Forward without graph, keeping each layer's input.
    bind(model, layout, w, None, true)?;
    let mut inputs_bsd = Vec::with_capacity(n_layers + 1);
    tch::no_grad(|| -> Result<()> {
        let mut x = model.embed(&batch.input_ids);
        for l in 0..n_layers {
            bind(model, layout, w, Some(l), false)?;
            let y = model.layer_forward(l, &x, &ctx);
            inputs_bsd.push(x);
            x = y;
            release(model, layout, w, Some(l));
        }
        inputs_bsd.push(x);
        Ok(())
    })?;

    // Head and loss, differentiated w.r.t. the final hidden state and the head's own weights.
    let h = inputs_bsd.pop().expect("final hidden state").detach().set_requires_grad(true);
    let logits = model.head(&h);
    let loss = loss_fn(&logits)?;
    drop(logits);
    let tied = model.config().tie_word_embeddings;
    let outer = params::trainable(model, layout, Some(None));
    let (head_params, embed_params): (Vec<_>, Vec<_>) = outer
        .into_iter()
        .partition(|(i, _)| layout.params[*i].name != "model.embed_tokens.weight" || tied);
    let mut inputs: Vec<&Tensor> = vec![&h];
    inputs.extend(head_params.iter().map(|(_, t)| t));
    let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)?;
    let mut g_out = grads[0].shallow_clone();
    for ((i, _), g) in head_params.iter().zip(&grads[1..]) {
        sink.add(*i, g)?;
    }
    drop(loss);

    for l in (0..n_layers).rev() {
        bind(model, layout, w, Some(l), true)?;
        let x_in = inputs_bsd.pop().expect("layer input").detach().set_requires_grad(true);
        let y = model.layer_forward(l, &x_in, &ctx);
        let surrogate = (&y * &g_out).sum(Kind::Float);
        let layer_params = params::trainable(model, layout, Some(Some(l)));
        let mut inputs: Vec<&Tensor> = vec![&x_in];
        inputs.extend(layer_params.iter().map(|(_, t)| t));
        let grads = Tensor::f_run_backward(&[&surrogate], &inputs, false, false)?;
        g_out = grads[0].shallow_clone();
        for ((i, _), g) in layer_params.iter().zip(&grads[1..]) {
            sink.add(*i, g)?;
        }
        sink.layer_done(Some(l))?;
        release(model, layout, w, Some(l));
    }

    // A trainable, untied embedding gets its gradient through the lookup.
    for (i, e) in &embed_params {
        let surrogate = (Tensor::embedding(e, &batch.input_ids, -1, false, false) * &g_out).sum(Kind::Float);
        let g = Tensor::f_run_backward(&[&surrogate], &[e], false, false)?;
        sink.add(*i, &g[0])?;
    }
    if layout.layers().contains(&None) {
        sink.layer_done(None)?;
    }
    release(model, layout, w, None);
    Ok(())
}
