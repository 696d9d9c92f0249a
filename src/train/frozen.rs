//! A method's frozen side model ([`methods::FrozenModel`], IT's small teacher): checked against
//! the student's vocabulary before any weights load, then loaded whole on every rank in the
//! compute dtype and run without grad on the batches of one objective.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::backward::{forward_logits, Weights};
use crate::data::{Batch, Tokenizer};
use crate::dist::zero::FlatLayout;
use crate::error::Error;
use crate::methods::{FrozenModel, Objective};
use crate::model::{load_model, Config, Llama};
use crate::Result;

pub(super) struct Frozen {
    pub on: Objective,
    model: Llama,
}

impl Frozen {
    /// Check `spec`'s frozen model against the student (`dir`, its config and tokenizer), then load it.
    pub fn load(spec: Option<&FrozenModel>, dir: &Path, cfg: &Config, tok: &Tokenizer, kind: Kind, device: Device) -> Result<Option<Self>> {
        let Some(fm) = spec else { return Ok(None) };
        check_same_vocabulary(fm, dir, cfg, tok)?;
        Ok(Some(Frozen { on: fm.on, model: load_model(&fm.dir, kind, device)?.model }))
    }

    /// Its logits on `batch`, without grad (`layout` is the student's and goes unused: every
    /// weight of this model is resident).
    pub fn logits(&mut self, layout: &FlatLayout, batch: &Batch) -> Result<Tensor> {
        forward_logits(&mut self.model, layout, &mut Weights::Resident, batch)
    }
}

/// The frozen model's logits must index the student's tokens: the same `vocab_size` in both
/// config.json files and the same vocabulary in both tokenizer.json files.
fn check_same_vocabulary(fm: &FrozenModel, dir: &Path, cfg: &Config, tok: &Tokenizer) -> Result<()> {
    let other_cfg = Config::from_model_dir(&fm.dir)?;
    if other_cfg.vocab_size != cfg.vocab_size {
        return Err(Error::format(
            fm.dir.join("config.json"),
            format!(
                "method.{}: vocab_size {} differs from the student's {} in {}; the two models must share one vocabulary",
                fm.key,
                other_cfg.vocab_size,
                cfg.vocab_size,
                dir.join("config.json").display()
            ),
        ));
    }
    let other_tok = Tokenizer::from_model_dir(&fm.dir, &other_cfg)?;
    if other_tok.vocab_fingerprint() != tok.vocab_fingerprint() {
        return Err(Error::format(
            other_tok.path(),
            format!(
                "method.{}: its vocabulary differs from the student's {} (same size, different tokens or ids); the two models \
                 must share one tokenizer",
                fm.key,
                tok.path().display()
            ),
        ));
    }
    Ok(())
}
