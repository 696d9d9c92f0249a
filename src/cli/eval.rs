//! `unlearn eval <benchmark>`: benchmark evaluation of one model directory, sharded over the
//! ranks when run under `mpirun` (every rank computes its share of the batches; rank 0 writes the
//! outputs). The benchmarks themselves are in `eval/` (one file each, listed in `eval/mod.rs`);
//! this is the wrapper that loads models from directories and writes the report.
//!
//! Outputs in `--out`: report.json, report.md, samples.jsonl, metrics.svg and record.json (the
//! reproduction record; replaced as a whole, only once everything has been computed). `--compare DIR` (repeatable) puts earlier reports
//! next to this one in report.md and the plot; `unlearn report` does the same for any set of
//! finished evaluations plus training curves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::template::template_for;
use crate::data::{Template, Tokenizer};
use crate::dist;
use crate::error::{Error, Result};
use crate::eval::args::CommonArgs;
use crate::eval::benchmark::{Benchmark, ModelFacts};
use crate::eval::context::EvalCtx;
use crate::eval::outputs::write_eval_outputs;
use crate::eval::report::{fmt_value, ModelInfo, Report, RunInfo, SampleRow};
use crate::eval::Benchmarks;
use crate::model::{load_model, parse_device, parse_kind, Config, LoadedModel};
use crate::record::{self, Input, Record};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub bench: Benchmarks,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let (c, bench_args) = args.bench.parts();
    // `--out` may be replaced by this evaluation: checked before any rank starts work.
    let inputs = bench_args.inputs();
    let mut all: Vec<&Path> = vec![&c.model];
    all.extend(inputs.iter().map(PathBuf::as_path));
    crate::files::check_output_dir(&c.out, &crate::files::EVAL_OUTPUT, &all, c.overwrite)?;
    let s = Session::new(c)?;
    let (cfg, tok) = config_and_tokenizer(&c.model)?;
    let (kind, source) = template_for(c.template, &c.model)?;
    let template = Template::load(kind, &c.model, &tok)?;
    tracing::info!("prompt template {} ({source})", template.describe());
    // The retain model is evaluated in the same prompt format, prepared for its own directory.
    let retain = match bench_args.retain_model() {
        Some(dir) => {
            let (_, rt) = config_and_tokenizer(dir)?;
            check_same_tokenizer(&tok, &c.model, &rt, dir)?;
            let rtemplate = Template::load(kind, dir, &rt)?;
            Some((rt, rtemplate))
        }
        None => None,
    };
    let mut bench = bench_args.prepare(&ModelFacts { config: &cfg, tok: &tok, template: &template })?;
    let compare: Vec<Report> = c.compare.iter().map(|p| Report::load(p)).collect::<Result<_>>()?;
    if let Some(dir) = bench.reference_model().map(Path::to_path_buf) {
        let m = s.load(&dir)?;
        let (rt, rtemplate) = retain.as_ref().expect("a reference model is the retain model, whose tokenizer was loaded");
        bench.measure_reference(&s.ctx(&m, rt, rtemplate, c))?;
    }
    let m = s.load(&c.model)?;
    let outcome = bench.evaluate(&s.ctx(&m, &tok, &template, c))?;
    drop(m);
    let mut report = s.report(c, &*bench, &tok, &template, &source)?;
    let samples = outcome.into_report(&mut report);
    let about = bench.describe();
    let mut inputs = vec![Input::Model("model", &c.model), Input::Data("benchmark", &about.data)];
    inputs.extend(about.inputs.iter().map(|(role, path)| Input::Data(role, path)));
    inputs.extend(bench.reference_model().map(|dir| Input::Model("retain_model", dir)));
    s.finish(c, report, &samples, &compare, &inputs)
}

/// A model directory's config and tokenizer, without loading the weights.
pub fn config_and_tokenizer(dir: &Path) -> Result<(Config, Tokenizer)> {
    let cfg = Config::from_model_dir(dir)?;
    let tok = Tokenizer::from_model_dir(dir, &cfg)?;
    Ok((cfg, tok))
}

/// The retain model must tokenize exactly as the evaluated one, or its numbers are not comparable.
pub fn check_same_tokenizer(main: &Tokenizer, main_dir: &Path, other: &Tokenizer, other_dir: &Path) -> Result<()> {
    if main.vocab_fingerprint() != other.vocab_fingerprint() {
        return Err(Error::format(
            other.path(),
            format!(
                "the retain model {} has a different tokenizer than the evaluated model {} (vocabulary fingerprints differ); both must share one tokenizer",
                other_dir.display(),
                main_dir.display()
            ),
        ));
    }
    Ok(())
}

/// Rank group, device and model-loading settings of one evaluation.
struct Session {
    comm: dist::Comm,
    device: tch::Device,
    kind: tch::Kind,
    start: Instant,
}

impl Session {
    fn new(c: &CommonArgs) -> Result<Session> {
        if c.batch_size == 0 || c.max_batch_tokens == 0 || c.gen_batch_size == 0 || c.max_gen_batch_tokens == 0 {
            return Err(crate::other!("batch sizes and token budgets must be positive"));
        }
        let device = dist::rank_device(parse_device(&c.device)?)?;
        let comm = dist::init(&c.dist, device)?;
        dist::watchdog::set_phase("evaluation");
        dist::set_cpu_threads();
        Ok(Session { comm, device, kind: parse_kind(&c.dtype)?, start: Instant::now() })
    }

    fn load(&self, dir: &Path) -> Result<LoadedModel> {
        tracing::info!("loading {}", dir.display());
        load_model(dir, self.kind, self.device)
    }

    fn ctx<'a>(&'a self, m: &'a LoadedModel, tok: &'a Tokenizer, template: &'a Template, c: &CommonArgs) -> EvalCtx<'a> {
        EvalCtx::new(&m.model, tok, template, &*self.comm, &m.config.eos_token_ids, c.score_batching(), c.gen_batching())
    }

    /// The report's header: what was evaluated, how, where (`source`: where the template choice came from).
    fn report(&self, c: &CommonArgs, bench: &dyn Benchmark, tok: &Tokenizer, template: &Template, source: &str) -> Result<Report> {
        let name = c.name.clone().unwrap_or_else(|| crate::model::hub::display_name(&c.model));
        let about = bench.describe();
        let mut limits = c.limits();
        limits.extend(about.limits);
        Ok(Report {
            benchmark: about.name.into(),
            name,
            model: ModelInfo {
                path: c.model.display().to_string(),
                sha256: String::new(), // set by `finish` from the record's digest (one read of the weights)
                tokenizer_fingerprint: tok.vocab_fingerprint(),
                dtype: c.dtype.clone(),
            },
            variant: about.variant.into(),
            data: about.data.display().to_string(),
            limits,
            metrics: Default::default(),
            order: vec![],
            notes: vec![],
            reference: None,
            truth_stats: None,
            template: Some(serde_json::json!({"name": template.name(), "detail": template.describe(), "source": source})),
            run: RunInfo { ranks: self.comm.world(), device: format!("{:?}", self.device), ..Default::default() },
        })
    }

    /// Rank 0 hashes `inputs` into the reproduction record and writes it with the report (one
    /// directory, published whole); everyone waits so that no rank exits (and tears down MPI) early.
    fn finish(&self, c: &CommonArgs, mut report: Report, samples: &[SampleRow], compare: &[Report], inputs: &[Input]) -> Result<()> {
        if self.comm.rank() == 0 {
            let settings = serde_json::json!({"benchmark": report.benchmark, "variant": report.variant, "data": report.data,
                "template": report.template, "dtype": c.dtype, "device": c.device, "limits": report.limits});
            let mut rec = Record::new("eval", settings, self.comm.world()).with_inputs(inputs)?;
            rec.metric_variant = Some(report.variant.clone());
            report.model.sha256 = rec.weights_sha256("model").unwrap_or_default().to_string();
            report.run.wall_s = self.start.elapsed().as_secs_f64();
            record::log_given(&c.model)?;
            write_eval_outputs(&c.out, &report, samples, compare, Some(&rec))?;
            record::log_written(&c.out, &rec.sha256());
            for (k, m) in report.ordered() {
                tracing::info!("{k} = {}", fmt_value(m.value));
            }
            tracing::info!("wrote {} ({:.1} s)", c.out.display(), report.run.wall_s);
        }
        self.comm.barrier()
    }
}
