//! The models the trainer runs (student, teacher) and where their trainable weights live.

use tch::{Device, Kind, Tensor};

use super::backward::Weights;
use super::params::{self, PendingGathers};
use crate::config::TeacherMode;
use crate::dist::zero::FlatLayout;
use crate::dist::Collective;
use crate::model::{Config, Llama};
use crate::Result;

/// Where a model's trainable weights live between passes.
pub(super) enum Residency {
    /// A compute-dtype replica of the whole flat buffer, bound to the model (ZeRO 0–2; the
    /// teacher with `dist.teacher = "replica"`).
    Replica(Tensor),
    /// Bound to the fp32 shard itself, updated in place by the optimizer or the method (fp32
    /// compute, one shard, ZeRO 0–2): one copy of the weights, as in a plain PyTorch loop, and
    /// nothing to copy after a step.
    Shard(Tensor),
    /// Nowhere: gathered layer by layer from the fp32 shards for each pass.
    Gathered,
}

/// A model the trainer runs (student or teacher). The model is reached only through
/// [`Net::pass`] (a pass that waits for each layer's post-update gathers as it reaches the layer)
/// or [`Net::ready`] (every gather completed first), so no reader can see a replica that is still
/// being gathered into.
pub(super) struct Net {
    model: Llama,
    residency: Residency,
    /// The replica's gathers issued after the last update and not yet waited for.
    arriving: PendingGathers,
}

impl Net {
    pub fn new(model: Llama, residency: Residency) -> Net {
        Net { model, residency, arriving: PendingGathers::default() }
    }

    /// The model for a pass and how the pass gets the trainable weights: resident, arriving
    /// (each layer waits for its post-update gathers just before it runs), or gathered per layer
    /// from `shard`.
    pub fn pass<'a>(&'a mut self, comm: &'a dyn Collective, shard: &'a Tensor, kind: Kind) -> (&'a mut Llama, Weights<'a>) {
        let w = match self.residency {
            Residency::Replica(_) if !self.arriving.is_empty() => Weights::Arriving(&mut self.arriving),
            Residency::Replica(_) | Residency::Shard(_) => Weights::Resident,
            Residency::Gathered => Weights::Gathered { comm, shard, kind },
        };
        (&mut self.model, w)
    }

    /// The model with every resident weight in place (waits for the gathers still in flight).
    pub fn ready(&mut self) -> Result<&mut Llama> {
        self.settle()?;
        Ok(&mut self.model)
    }

    /// The model's configuration (no weights read).
    pub fn config(&self) -> &Config {
        self.model.config()
    }

    pub fn is_gathered(&self) -> bool {
        matches!(self.residency, Residency::Gathered)
    }

    /// The resident replica (waits for the gathers still in flight).
    pub fn replica(&mut self) -> Result<Option<&Tensor>> {
        self.settle()?;
        Ok(match &self.residency {
            Residency::Replica(t) | Residency::Shard(t) => Some(t),
            Residency::Gathered => None,
        })
    }

    /// Wait for the replica's post-update gathers: before anything reads the replica outside a
    /// pass, and before the shards they read from are written (a collective is never left in
    /// flight).
    pub fn settle(&mut self) -> Result<()> {
        self.arriving.wait_all()
    }

    /// Copy `shard` into the compute replica (all-gather when sharded); nothing when gathered or
    /// when the replica is the shard. With `overlap` the gathers are only started: the next pass
    /// waits for each layer's as it reaches the layer, anyone else for all of them.
    pub fn sync(&mut self, layout: &FlatLayout, comm: &dyn Collective, shard: &Tensor, overlap: bool) -> Result<()> {
        self.settle()?;
        if let Residency::Replica(full) = &mut self.residency {
            if overlap && layout.shards > 1 {
                self.arriving = PendingGathers::start(layout, comm, shard, full)?;
            } else {
                let all: Vec<usize> = (0..layout.buckets.len()).collect();
                tch::no_grad(|| layout.gather_buckets(comm, shard, full, &all, 0))?;
            }
        }
        Ok(())
    }
}

/// The teacher's model: a shallow copy of the student's frozen weights, with its trainable
/// weights in a compute replica (gathered once from the initial master), bound to `own_shard` (the
/// method's fp32 teacher shard, where the replicas are the shards) or gathered per pass.
#[allow(clippy::too_many_arguments)]
pub(super) fn teacher_net(
    student: &mut Net,
    mode: TeacherMode,
    own_shard: Option<&Tensor>,
    layout: &FlatLayout,
    comm: &dyn Collective,
    master: &Tensor,
    kind: Kind,
    device: Device,
) -> Result<Net> {
    let mut model = student.ready()?.shallow_copy();
    match (mode, own_shard) {
        (TeacherMode::Replica, Some(shard)) => {
            let shard = shard.shallow_clone();
            params::bind(&mut model, layout, &shard, 0, None, false);
            Ok(Net::new(model, Residency::Shard(shard)))
        }
        (TeacherMode::Replica, None) => {
            let full = match student.replica()? {
                Some(f) => f.copy(),
                None => gathered_replica(layout, comm, master, kind, device)?,
            };
            params::bind(&mut model, layout, &full, 0, None, false);
            Ok(Net::new(model, Residency::Replica(full)))
        }
        (TeacherMode::Gather, _) => {
            for l in layout.layers() {
                params::release(&mut model, layout, l);
            }
            Ok(Net::new(model, Residency::Gathered))
        }
    }
}

/// The student's model for fp32 passes on the master weights (AutoLR probes): frozen weights in
/// fp32 (copies of a bf16 model's, the same tensors in an fp32 model), trainable weights released,
/// to be gathered layer by layer from the fp32 master shards.
pub(super) fn probe_model(student: &Llama, layout: &FlatLayout) -> Llama {
    let mut model = student.shallow_copy();
    let index = params::param_index(layout);
    let dev = model.device();
    tch::no_grad(|| {
        model.visit_params_mut(|name, t| {
            *t = if index.contains_key(name) { Tensor::empty([0], (Kind::Float, dev)) } else { t.to_kind(Kind::Float) };
        })
    });
    model
}

/// The whole flat buffer in the compute dtype, all-gathered from the fp32 shards (collective).
pub(super) fn gathered_replica(layout: &FlatLayout, comm: &dyn Collective, master: &Tensor, kind: Kind, device: Device) -> Result<Tensor> {
    let full = Tensor::zeros([layout.total], (kind, device));
    tch::no_grad(|| layout.gather_buckets(comm, master, &mut full.shallow_clone(), &(0..layout.buckets.len()).collect::<Vec<_>>(), 0))?;
    Ok(full)
}
