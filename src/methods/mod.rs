//! Unlearning methods. A method is one file that declares everything about itself:
//!
//! * its `[method]` settings: a typed struct its parser fills from the config through
//!   [`config::Section`] (the keys it reads are the only keys it accepts), registered once in
//!   [`REGISTRY`], the only list of method names;
//! * a [`Spec`]: the objectives it trains on and the loss of each, whether its direction needs the
//!   separate reduced gradients or only their weighted sum, whether it needs the EMA teacher or a
//!   reference pass, and the memory of its update. The config checks the data against it, the
//!   trainer builds its buffers from it and the planner counts memory from it: none of them
//!   matches on a method's name;
//! * the recipe ([`Method`]): the loss of each objective from the student's logits on a batch,
//!   one-off passes of its own before training (through the trainer's [`Passes`]), and how the
//!   *reduced* gradient shards combine into one update direction. It never sees ranks, buckets or
//!   parameter names; the trainer differentiates, reduces and steps.
//!
//! Sign convention: each buffer holds the gradient of the loss the method returns for that
//! objective (e.g. NGDiff's forget buffer is ∇NLL_F, GA's is ∇(−NLL_F)); `direction` returns `d`
//! such that the optimizer moves the parameters by `−lr·d` (before momentum/Adam).

pub mod autolr;
pub mod finetune;
pub mod ga;
pub mod graddiff;
pub mod it;
pub mod losses;
pub mod lossnorm;
pub mod mean_teacher;
pub mod ngdiff;
pub mod npo;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use tch::Tensor;

use crate::config::{Section, Trainable};
use crate::data::loader::LocalBatch;
use crate::data::Batch;
use crate::Result;

/// Every method `method.name` can name, with the parser of its settings.
pub const REGISTRY: &[Registration] = &[
    finetune::REGISTRATION,
    ga::REGISTRATION,
    graddiff::REGISTRATION,
    npo::REGISTRATION,
    ngdiff::REGISTRATION,
    mean_teacher::REGISTRATION,
    it::REGISTRATION,
    lossnorm::REGISTRATION,
];

/// The registry's names, in its order.
pub const NAMES: &[&str] = &registry_names::<{ REGISTRY.len() }>();

const fn registry_names<const N: usize>() -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = REGISTRY[i].name;
        i += 1;
    }
    out
}

/// A method's entry in the registry.
pub struct Registration {
    pub name: &'static str,
    /// Read the method's keys of `[method]` (all but `name`) into its settings.
    pub parse: fn(&Section) -> Result<MethodCfg>,
}

/// The registration named `name`.
pub fn lookup(name: &str) -> Option<&'static Registration> {
    REGISTRY.iter().find(|r| r.name == name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Forget,
    Retain,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Forget => "forget",
            Objective::Retain => "retain",
        }
    }
}

/// The loss a pass differentiates, as far as memory is concerned (the planner's
/// `plan::activations` counts the bytes of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Token-mean NLL (finetune, GA, GradDiff, NGDiff, NPO's retain term).
    Nll,
    /// NPO's forget loss (one graph-carrying log-softmax, like NLL).
    Npo,
    /// Mean teacher's forget loss: a logged no-grad NLL, the graph-carrying log-probs, and the
    /// detached probabilities for the weights.
    Nlul,
    /// KL(teacher ‖ student) over the vocabulary at every position.
    Kl,
    /// Quadratic KL (teacher Fisher).
    Qkl,
}

/// Which reduced gradients the direction reads.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gradients {
    /// Each objective's reduced gradient on its own (NGDiff normalises each by its own norm).
    Separate,
    /// Only `forget·g_F + retain·g_R` (the direction may then scale, clip or add to that sum), so
    /// one accumulator and one reduction of the weighted sum would serve.
    WeightedSum { forget: f64, retain: f64 },
}

/// A pass a method runs once before training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReferencePass {
    /// From a separately loaded model (else from the student before its first step).
    pub separate_model: bool,
}

/// A frozen model loaded whole on every rank beside the student, whose no-grad logits on the
/// batches of `on` reach [`Method::loss`] as [`Aux::frozen_logits`] (IT's small teacher). Its
/// vocabulary must be the student's: the trainer checks both files before loading any weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrozenModel {
    pub on: Objective,
    /// The `method.*` key that names it, for errors.
    pub key: &'static str,
    pub dir: PathBuf,
}

/// The memory of a method's update, in shard-sized buffers, for the planner.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct UpdateShape {
    /// The direction is a shallow clone of a gradient shard (no new buffer).
    pub direction_aliases: bool,
    /// Temporaries alive while `direction` builds `d` (besides `d`).
    pub direction_temps: f64,
    /// Temporaries of `after_step` (the EMA update).
    pub after_step_temps: f64,
}

/// What a method declares about itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spec {
    /// The objectives that get a batch and a gradient buffer every micro-step, in the order they
    /// run, with the loss each differentiates.
    pub losses: Vec<(Objective, LossKind)>,
    /// The objective whose batches also go through the EMA teacher (mean teacher's retain text).
    pub teacher_on: Option<Objective>,
    pub gradients: Gradients,
    pub reference: Option<ReferencePass>,
    /// A separately loaded frozen model run on one objective's batches (IT).
    pub frozen_model: Option<FrozenModel>,
    /// The trainable set when `model.trainable` is not given: what the method's own recipe trains
    /// (every weight for the NGDiff paper's, TOFU's and open-unlearning's baselines; attention and
    /// MLP matrices for mt-unlearn's mean teacher and its baselines).
    pub trainable: Trainable,
    /// NGDiff's AutoLR probe: three extra forwards around a trial step, every this many steps.
    pub autolr: Option<u64>,
    /// The method clips its own update and scales other state by the clip factor, so a global
    /// clip (`optim.clip_norm`) on top is refused.
    pub clips_itself: bool,
    pub update: UpdateShape,
}

impl Spec {
    /// A method that needs nothing beyond its objectives, the gradients it reads and its default
    /// trainable set.
    pub fn new(losses: Vec<(Objective, LossKind)>, gradients: Gradients, update: UpdateShape, trainable: Trainable) -> Self {
        Spec {
            losses,
            teacher_on: None,
            gradients,
            reference: None,
            frozen_model: None,
            trainable,
            autolr: None,
            clips_itself: false,
            update,
        }
    }

    pub fn objectives(&self) -> Vec<Objective> {
        self.losses.iter().map(|(o, _)| *o).collect()
    }

    pub fn uses(&self, obj: Objective) -> bool {
        self.losses.iter().any(|(o, _)| *o == obj)
    }

    pub fn teacher(&self) -> bool {
        self.teacher_on.is_some()
    }
}

/// The shapes of update most methods have.
impl UpdateShape {
    /// `d` is one gradient shard itself.
    pub const ALIAS: UpdateShape = UpdateShape { direction_aliases: true, direction_temps: 0.0, after_step_temps: 0.0 };
    /// `d` is a new shard built with `temps` temporaries.
    pub const fn built(temps: f64) -> UpdateShape {
        UpdateShape { direction_aliases: false, direction_temps: temps, after_step_temps: 0.0 }
    }
}

/// A method's validated settings: what it declares, and how to build its recipe.
pub trait MethodConfig: fmt::Debug + Send + Sync + SettingsTable {
    fn name(&self) -> &'static str;
    fn spec(&self) -> Spec;
    /// What `data.forget` / `data.retain` must hold, for the error when it is missing.
    fn data_words(&self, obj: Objective) -> &'static str {
        match obj {
            Objective::Forget => "forget data",
            Objective::Retain => "retain data",
        }
    }
    /// Model directories the method reads, by their `method.*` key (checked to exist).
    fn model_dirs(&self) -> Vec<(&'static str, &Path)> {
        vec![]
    }
    /// The recipe. `params` is this rank's initial fp32 parameter shard (a teacher starts equal
    /// to it); `lr` the configured learning rate (AutoLR starts from it).
    fn build(&self, params: &Tensor, lr: f64) -> Result<Box<dyn Method>>;
}

/// The settings as a TOML table (the resolved config written with every run).
pub trait SettingsTable {
    fn settings_table(&self) -> toml::Table;
}

impl<T: Serialize> SettingsTable for T {
    fn settings_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("method settings serialize to TOML")
    }
}

/// The `[method]` section of a run config: one method's settings.
#[derive(Clone)]
pub struct MethodCfg(Arc<dyn MethodConfig>);

impl MethodCfg {
    pub fn new(settings: impl MethodConfig + 'static) -> Self {
        MethodCfg(Arc::new(settings))
    }
}

impl std::ops::Deref for MethodCfg {
    type Target = dyn MethodConfig;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl fmt::Debug for MethodCfg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for MethodCfg {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut table = self.0.settings_table();
        table.insert("name".into(), self.0.name().into());
        table.serialize(s)
    }
}

/// What the trainer computes before calling [`Method::loss`], on the same batch.
#[derive(Default)]
pub struct Aux {
    /// Teacher logits `[b, t, v]` (on the objective [`Spec::teacher_on`] names), without grad.
    pub teacher_logits: Option<Tensor>,
    /// The frozen model's logits `[b, t, v]` (on the objective [`Spec::frozen_model`] names).
    pub frozen_logits: Option<Tensor>,
}

/// Which weights a [`Passes::per_example`] pass runs.
pub enum PassModel<'a> {
    /// The student as it is now (before training: the model as loaded).
    Student,
    /// A model directory, loaded whole for the pass and dropped after it.
    Load(&'a Path),
}

/// Passes over a data set that the trainer runs for a method before training.
pub trait Passes {
    /// One number per example of `obj`'s data set, in its order: `value` maps the no-grad logits
    /// of a batch of examples under `model` to one number per row. The examples are spread over
    /// the ranks and the numbers gathered onto every rank.
    fn per_example(
        &mut self,
        obj: Objective,
        model: PassModel,
        label: &str,
        value: &mut dyn FnMut(&Tensor, &Batch) -> Result<Vec<f64>>,
    ) -> Result<Vec<f64>>;
}

/// A loss to differentiate and the value to log.
pub struct LossOut {
    pub loss: Tensor,
    /// This rank's share of the logged value (the trainer sums it over ranks).
    pub value: f64,
}

/// Reduced gradient statistics, identical on every rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct GradStats {
    pub sq_forget: f64,
    pub sq_retain: f64,
    /// ⟨g_F, g_R⟩, so that ‖g_F + g_R‖ needs no extra reduction.
    pub dot: f64,
}

/// The reduced gradients a step combines, as the spec's [`Gradients`] declares.
pub enum Reduced<'a> {
    /// `Gradients::Separate`: each used objective's reduced gradient shard, with their global
    /// statistics.
    Separate { forget: Option<&'a Tensor>, retain: Option<&'a Tensor>, stats: GradStats },
    /// `Gradients::WeightedSum`: the shard of `forget·g_F + retain·g_R` (the declared weights
    /// already applied) and its global squared norm.
    Sum { g: &'a Tensor, sq: f64 },
}

/// What [`Method::direction`] reads.
pub struct Grads<'a> {
    pub reduced: Reduced<'a>,
    /// The step's logged losses (summed over ranks, averaged over accumulation steps), identical
    /// on every rank; 0 for an objective the method does not use (LossNorm divides by them).
    pub loss_forget: f64,
    pub loss_retain: f64,
    /// This rank's shard of the current fp32 parameters.
    pub params: &'a Tensor,
}

impl Grads<'_> {
    /// The weighted sum and its global ‖·‖² (methods that declare `WeightedSum`).
    pub fn sum(&self) -> (&Tensor, f64) {
        match self.reduced {
            Reduced::Sum { g, sq } => (g, sq),
            Reduced::Separate { .. } => panic!("a method declaring separate gradients asked for their sum"),
        }
    }

    /// Each objective's gradient and the statistics (methods that declare `Separate`).
    pub fn separate(&self) -> (Option<&Tensor>, Option<&Tensor>, GradStats) {
        match self.reduced {
            Reduced::Separate { forget, retain, stats } => (forget, retain, stats),
            Reduced::Sum { .. } => panic!("a method declaring a weighted sum asked for separate gradients"),
        }
    }
}

/// The update direction and what to log about it.
pub struct Direction {
    pub d: Tensor,
    /// Clip factor applied (1 = none), logged and used by mean teacher's EMA rate.
    pub clip: f64,
}

/// A method's recipe, built from its settings for one run.
pub trait Method {
    /// One-off work before the first step (NPO's reference log-likelihoods).
    fn prepare(&mut self, _passes: &mut dyn Passes) -> Result<()> {
        Ok(())
    }
    /// The loss for `obj` from the student's logits on `batch`; by default the token-mean NLL
    /// (finetune, GDiff and NGDiff differentiate exactly that and differ only in `direction`).
    fn loss(&mut self, _obj: Objective, logits_btv: &Tensor, batch: &LocalBatch, _aux: &Aux) -> Result<LossOut> {
        nll_loss(logits_btv, batch)
    }
    /// Combine the reduced gradients into the update direction (this rank's shard).
    fn direction(&mut self, g: &Grads) -> Result<Direction>;
    /// After the optimizer step, with the updated parameter shard.
    fn after_step(&mut self, _params: &Tensor, _dir: &Direction) -> Result<()> {
        Ok(())
    }
    /// The fp32 EMA teacher shard, for methods that keep one.
    fn teacher_shard(&self) -> Option<&Tensor> {
        None
    }
    fn teacher_shard_mut(&mut self) -> Option<&mut Tensor> {
        None
    }
    /// The AutoLR controller, for methods that use one.
    fn autolr(&mut self) -> Option<&mut autolr::AutoLr> {
        None
    }
}

/// The token-mean NLL as a loss to differentiate (finetune, GDiff, NGDiff, NPO's retain term).
pub(crate) fn nll_loss(logits_btv: &Tensor, batch: &LocalBatch) -> Result<LossOut> {
    let loss = batch_nll(logits_btv, batch);
    Ok(LossOut { value: loss.double_value(&[]), loss })
}

/// Token-mean NLL of the targets of a batch against the global target count: the loss of
/// finetune/GA/GDiff/NGDiff, and the value every method logs for the forget set.
pub(crate) fn batch_nll(logits_btv: &Tensor, batch: &LocalBatch) -> Tensor {
    losses::nll(&batch_logprobs(logits_btv, batch), batch.global.targets.max(1) as f64)
}

/// Target-token log-probs of a batch (see [`losses::target_logprobs`]).
pub(crate) fn batch_logprobs(logits_btv: &Tensor, batch: &LocalBatch) -> Tensor {
    losses::target_logprobs(logits_btv, &batch.batch.input_ids, &batch.batch.target_mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;

    fn settings(name: &str, keys: &str) -> MethodCfg {
        let text = format!(
            "[model]\npath = \"m\"\n[data]\nforget = \"f\"\nretain = \"r\"\n[method]\nname = \"{name}\"\n{keys}\n\
             [optim]\nname = \"sgd\"\nlr = 0.1\n[train]\nsteps = 1\nbatch_size = 1\nout_dir = \"o\"\n"
        );
        RunConfig::from_table(&text.parse().unwrap(), "test", false).unwrap().method
    }

    /// The trainer builds `forget·g_F + retain·g_R` from a `WeightedSum` declaration and hands the
    /// method only that sum: with nothing else in play (clip, proximal pull), the direction must be
    /// the method's own definition of its update, so the declared weights are the right ones.
    #[test]
    fn declared_weighted_sums_give_each_methods_own_update() {
        let f = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let r = Tensor::from_slice(&[0.25f32, 4.0, -1.0]);
        let p = Tensor::from_slice(&[0.1f32, 0.2, 0.3]);
        // (name, keys, the update as the method's paper or baseline defines it)
        let cases: [(&str, &str, Tensor); 8] = [
            ("finetune", "", r.copy()),
            ("ga", "", f.copy()),
            ("graddiff", "forget_weight = 0.25\nretain_weight = 2.0", &r * 2.0 - &f * 0.25),
            ("npo", "", &f + &r),
            ("npo", "retain_weight = 0.0", f.copy()),
            ("npo", "retain_weight = 0.5", &f + &r * 0.5),
            ("mean-teacher", "damp = 0.0\nclip = 1e9", &f + &r),
            ("it", "teacher_model = \"small\"", &f + &r),
        ];
        for (name, keys, want) in cases {
            let cfg = settings(name, keys);
            let spec = cfg.spec();
            let Gradients::WeightedSum { forget, retain } = spec.gradients else { panic!("{name}: expected a weighted sum") };
            let mut sum = Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu));
            if spec.uses(Objective::Forget) {
                sum += &f * forget;
            }
            if spec.uses(Objective::Retain) {
                sum += &r * retain;
            }
            let sq = sum.square().sum(tch::Kind::Double).double_value(&[]);
            let mut m = cfg.build(&p, 0.1).unwrap();
            let d =
                m.direction(&Grads { reduced: Reduced::Sum { g: &sum, sq }, loss_forget: 2.0, loss_retain: 0.5, params: &p }).unwrap().d;
            let err = (&d - &want).abs().max().double_value(&[]);
            assert!(err < 1e-6, "{name} {keys:?}: direction {d:?} from the declared weights ({forget}, {retain}) is not {want:?}");
        }
        assert_eq!(settings("ngdiff", "").spec().gradients, Gradients::Separate);
        assert_eq!(settings("lossnorm", "").spec().gradients, Gradients::Separate);
    }

    /// LossNorm weighs each reduced gradient by the inverse of its step loss.
    #[test]
    fn lossnorm_divides_each_gradient_by_its_loss() {
        let f = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let r = Tensor::from_slice(&[0.25f32, 4.0, -1.0]);
        let p = Tensor::from_slice(&[0.1f32, 0.2, 0.3]);
        let mut m = settings("lossnorm", "eps = 1e-8").build(&p, 0.1).unwrap();
        let reduced = Reduced::Separate { forget: Some(&f), retain: Some(&r), stats: GradStats::default() };
        let grads = Grads { reduced, loss_forget: 2.0, loss_retain: 0.5, params: &p };
        let d = m.direction(&grads).unwrap().d;
        let want = &r * (1.0 / (0.5 + 1e-8)) - &f * (1.0 / (2.0 + 1e-8));
        assert!((&d - &want).abs().max().double_value(&[]) < 1e-6, "{d:?} vs {want:?}");
    }

    /// Each method declares its own default trainable set (issue 14: every weight for the NGDiff
    /// paper's, TOFU's and open-unlearning's baselines, matrices for mt-unlearn's mean teacher and
    /// IT), the config applies it when `model.trainable` is absent, and an explicit value wins.
    #[test]
    fn the_trainable_default_is_the_methods_and_an_explicit_value_wins() {
        use crate::config::Trainable;
        let cases = [
            ("finetune", "", Trainable::All),
            ("ga", "", Trainable::All),
            ("graddiff", "", Trainable::All),
            ("npo", "", Trainable::All),
            ("ngdiff", "", Trainable::All),
            ("lossnorm", "", Trainable::All),
            ("mean-teacher", "", Trainable::Matrices),
            ("it", "teacher_model = \"small\"", Trainable::Matrices),
        ];
        assert_eq!(cases.len(), REGISTRY.len(), "a method without a case here");
        for (name, keys, want) in cases {
            assert_eq!(settings(name, keys).spec().trainable, want, "{name}");
            let resolved = |model_keys: &str| {
                let text = format!(
                    "[model]\npath = \"m\"\n{model_keys}\n[data]\nforget = \"f\"\nretain = \"r\"\n[method]\nname = \"{name}\"\n{keys}\n\
                     [optim]\nname = \"sgd\"\nlr = 0.1\n[train]\nsteps = 1\nbatch_size = 1\nout_dir = \"o\"\n"
                );
                RunConfig::from_table(&text.parse().unwrap(), "test", false).unwrap().model.trainable
            };
            assert_eq!(resolved(""), want, "{name}: default");
            assert_eq!(resolved("trainable = \"all\""), Trainable::All, "{name}: explicit all");
            assert_eq!(resolved("trainable = \"matrices\""), Trainable::Matrices, "{name}: explicit matrices");
        }
    }

    /// NPO's retain term is on by default with open-unlearning's α = 1; 0 turns it off.
    #[test]
    fn npo_retain_weight_defaults_to_one() {
        let spec = settings("npo", "").spec();
        assert_eq!(spec.gradients, Gradients::WeightedSum { forget: 1.0, retain: 1.0 });
        assert!(spec.uses(Objective::Retain));
        assert!(!settings("npo", "retain_weight = 0.0").spec().uses(Objective::Retain));
    }

    #[test]
    fn the_registry_names_every_method_once() {
        let mut names = NAMES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        for r in REGISTRY {
            assert_eq!(lookup(r.name).map(|l| l.name), Some(r.name));
        }
    }
}
