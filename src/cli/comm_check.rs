//! `unlearn comm-check`: run every collective of a backend once on known data and check the
//! results exactly, then the ZeRO paths built on them (`FlatLayout` gather, reduce-scatter,
//! bucketed all-reduce). For bringing up a machine or a cluster: world size 1 under NCCL (the GPU
//! image has no MPI), or `mpirun -np N launch/mpirun.sh comm-check` for several ranks.
//!
//! Every value is a small integer, so every sum is exact in fp32 and bf16 and any difference is
//! a transport error, not rounding.

use std::fmt::Write;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::dist::zero::FlatLayout;
use crate::dist::{self, Collective};
use crate::model::{param_specs, parse_device, Config};
use crate::Result;

#[derive(clap::Args, Debug)]
pub struct CommCheckArgs {
    /// Backend: auto, none, mpi or nccl (as `dist.backend`).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Device of the buffers: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Elements per rank of the plain collectives' buffers.
    #[arg(long, default_value_t = 1 << 20)]
    pub elems: i64,
}

/// One checked operation: its name, the largest deviation from the expected values, and time.
struct Check {
    name: String,
    max_err: f64,
    seconds: f64,
}

fn max_err(got: &Tensor, want: &Tensor) -> f64 {
    (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn timed(name: &str, f: impl FnOnce() -> Result<f64>) -> Result<Check> {
    let t = Instant::now();
    let max_err = f()?;
    Ok(Check { name: name.into(), max_err, seconds: t.elapsed().as_secs_f64() })
}

/// Run `unlearn comm-check`; returns the report (rank 0's; other ranks return an empty string).
pub fn run(args: &CommCheckArgs) -> Result<String> {
    // The same rank -> GPU mapping as `run` and `eval`.
    let device = dist::rank_device(parse_device(&args.device)?)?;
    let comm = dist::init(&args.backend, device)?;
    dist::watchdog::set_phase("comm-check");
    let checks = run_checks(&*comm, device, args.elems)?;
    let (rank, world) = (comm.rank(), comm.world());
    let mut errs: Vec<f64> = checks.iter().map(|c| c.max_err).collect();
    comm.all_reduce_max_f64(&mut errs)?;
    comm.barrier()?;
    let failed: Vec<&str> = checks.iter().zip(&errs).filter(|(_, e)| **e != 0.0).map(|(c, _)| c.name.as_str()).collect();
    if !failed.is_empty() {
        return Err(crate::Error::Mismatch(format!(
            "comm-check ({}, {world} ranks): wrong results from {}",
            comm.backend(),
            failed.join(", ")
        )));
    }
    if rank != 0 {
        return Ok(String::new());
    }
    let mut out = format!("comm-check: backend {}, {world} rank(s), device {:?}\n", comm.backend(), device);
    for (c, e) in checks.iter().zip(&errs) {
        let _ = writeln!(out, "  {:<52} max error {e:.1e}  {:>8.3} ms  ok", c.name, c.seconds * 1e3);
    }
    Ok(out)
}

fn run_checks(comm: &dyn Collective, device: Device, n: i64) -> Result<Vec<Check>> {
    let (r, w) = (comm.rank() as f64, comm.world() as i64);
    let tri = (w * (w + 1) / 2) as f64; // Σ (rank + 1)
    let opts = |k: Kind| (k, device);
    let pattern = |len: i64, modulo: i64, k: Kind| (Tensor::arange(len, (Kind::Int64, device)).remainder(modulo) + 1).to_kind(k);
    let mut checks = vec![];
    for kind in [Kind::Float, Kind::BFloat16] {
        let tag = if kind == Kind::Float { "f32" } else { "bf16" };
        // fp32: rank r adds (r+1)·pattern, sum tri·pattern. bf16 is exact only up to 256, and a
        // ring's partial sums must stay exact too: every rank adds the same 1..2 pattern, sum w·p.
        let (scale, total, modulo) = if kind == Kind::Float { (r + 1.0, tri, 7) } else { (1.0, w as f64, 2) };
        checks.push(timed(&format!("all_reduce_sum ({tag})"), || {
            let mut t = pattern(n, modulo, kind) * scale;
            comm.all_reduce_sum(&mut t)?;
            Ok(max_err(&t, &(pattern(n, modulo, Kind::Float) * total)))
        })?);
        checks.push(timed(&format!("reduce_scatter_sum ({tag})"), || {
            let full = pattern(n * w, modulo + 1, kind) * scale;
            let mut shard = Tensor::zeros([n], opts(kind));
            comm.reduce_scatter_sum(&full, &mut shard)?;
            let want = pattern(n * w, modulo + 1, Kind::Float).narrow(0, comm.rank() as i64 * n, n) * total;
            Ok(max_err(&shard, &want))
        })?);
        checks.push(timed(&format!("all_gather ({tag})"), || {
            // Rank r contributes r+1 everywhere (exact in bf16 too).
            let shard = Tensor::ones([n], opts(kind)) * (r + 1.0);
            let mut full = Tensor::zeros([n * w], opts(kind));
            comm.all_gather(&shard, &mut full)?;
            let want = (Tensor::arange(n * w, (Kind::Int64, device)).divide_scalar_mode(n, "floor") + 1).to_kind(Kind::Float);
            Ok(max_err(&full, &want))
        })?);
        checks.push(timed(&format!("broadcast from rank 0 ({tag})"), || {
            let mut t = if comm.rank() == 0 { pattern(n, 11, kind) } else { Tensor::zeros([n], opts(kind)) };
            comm.broadcast(&mut t, 0)?;
            Ok(max_err(&t, &pattern(n, 11, Kind::Float)))
        })?);
    }
    checks.push(timed("all_reduce_f64 / all_reduce_max_f64", || {
        let mut s = [r + 1.0, 2.0];
        comm.all_reduce_f64(&mut s)?;
        let mut m = [r, -r];
        comm.all_reduce_max_f64(&mut m)?;
        Ok((s[0] - tri).abs() + (s[1] - 2.0 * w as f64).abs() + (m[0] - (w - 1) as f64).abs() + m[1].abs())
    })?);
    checks.push(timed("broadcast_bytes", || {
        let mut b = if comm.rank() == 0 { b"unlearn".to_vec() } else { vec![] };
        comm.broadcast_bytes(&mut b, 0)?;
        Ok(if b == b"unlearn" { 0.0 } else { 1.0 })
    })?);
    checks.push(timed("start_* in flight while compute runs (8 buckets)", || overlapped(comm, device, n))?);
    checks.extend(flat_layout_checks(comm, device)?);
    Ok(checks)
}

/// Collectives issued with `start_*` while compute goes on, as the trainer issues gradient
/// buckets: each bucket is produced by a kernel just before its collective starts (an ordering
/// error reads it unfinished), the buffer a finished bucket came from is overwritten by the next
/// bucket's kernels (an error there corrupts a result still in flight), and everything is waited
/// for at the end only. Exact integers, fp32.
fn overlapped(comm: &dyn Collective, device: Device, n: i64) -> Result<f64> {
    let (r, w) = (comm.rank() as i64, comm.world() as i64);
    let tri = (w * (w + 1) / 2) as f64;
    let n = (n / w).max(1) * w;
    let base = (Tensor::arange(n, (Kind::Int64, device)).remainder(5) + 1).to_kind(Kind::Float);
    let mut work = Tensor::zeros([n], (Kind::Float, device));
    let mut pending = vec![];
    let mut outputs = vec![];
    for k in 0..8 {
        // The bucket: (r+1)·(k+1)·base, written by kernels queued just before the collective.
        let bucket = &base * ((r + 1) * (k + 1)) as f64;
        work.copy_(&(&bucket * 3.0)); // compute queued behind the collective's input
        let shard = Tensor::zeros([n / w], (Kind::Float, device));
        if k % 2 == 0 {
            pending.push(comm.start_all_reduce(bucket.shallow_clone())?);
            outputs.push((k, bucket, None));
        } else {
            pending.push(comm.start_reduce_scatter(bucket, shard.shallow_clone())?);
            outputs.push((k, shard, Some(r)));
        }
    }
    crate::dist::wait_all(pending)?;
    let mut err = 0f64;
    for (k, out, part) in outputs {
        let want = &base * (tri * (k + 1) as f64);
        let want = match part {
            Some(r) => want.narrow(0, r * (n / w), n / w),
            None => want,
        };
        err = err.max(max_err(&out, &want));
    }
    Ok(err)
}

/// The ZeRO paths: shard round trip, bucketed gather, reduce-scatter and all-reduce, on the flat
/// layout of a small Llama (odd sizes, so buckets carry padding).
fn flat_layout_checks(comm: &dyn Collective, device: Device) -> Result<Vec<Check>> {
    let cfg = Config {
        vocab_size: 97,
        hidden_size: 40,
        intermediate_size: 72,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 10,
        ..Config::llama2_7b()
    };
    let specs = param_specs(&cfg);
    let refs: Vec<_> = specs.iter().collect();
    let (rank, world) = (comm.rank(), comm.world());
    let layout = FlatLayout::new(&refs, world, 1000);
    let all: Vec<usize> = (0..layout.buckets.len()).collect();
    let f32_on = (Kind::Float, device);
    let tri = (world * (world + 1) / 2) as f64;
    let full = Tensor::arange(layout.total, f32_on);
    let mut out = vec![];
    for kind in [Kind::Float, Kind::BFloat16] {
        let tag = if kind == Kind::Float { "f32" } else { "bf16" };
        out.push(timed(&format!("FlatLayout shard + gather_buckets ({tag})"), || {
            // bf16 holds integers exactly only up to 256: gather small values.
            let src = if kind == Kind::Float { full.shallow_clone() } else { full.remainder(200) };
            let shard = layout.extract_shard(&src, rank);
            let mut back = Tensor::zeros([layout.total], (kind, device));
            layout.gather_buckets(comm, &shard, &mut back, &all, 0)?;
            Ok(max_err(&back, &src))
        })?);
    }
    out.push(timed("FlatLayout reduce_scatter_add (ZeRO-2/3 gradients)", || {
        let mut shard = Tensor::zeros([layout.shard_len()], f32_on);
        let grad = full.remainder(13) * (rank as f64 + 1.0);
        for b in 0..layout.buckets.len() {
            let bk = &layout.buckets[b];
            layout.reduce_scatter_add(comm, b, &grad.narrow(0, bk.offset, bk.padded), &mut shard)?;
        }
        Ok(max_err(&shard, &layout.extract_shard(&(full.remainder(13) * tri), rank)))
    })?);
    out.push(timed("FlatLayout all_reduce_full (ZeRO-0/1 gradients)", || {
        let mut grad = full.remainder(13) * (rank as f64 + 1.0);
        layout.all_reduce_full(comm, &mut grad)?;
        Ok(max_err(&grad, &(full.remainder(13) * tri)))
    })?);
    Ok(out)
}
