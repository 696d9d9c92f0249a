//! Gradient reduction throughput over MPI (CPU, fp32): the trainer's bucketed paths against one
//! plain MPI call on the same bytes.
//!
//! * `FlatLayout::all_reduce_full` (ZeRO-0/1): one all-reduce per bucket of a full flat buffer;
//! * `FlatLayout::reduce_scatter_add` (ZeRO-2/3): one reduce-scatter per bucket into the shard;
//! * baselines: one `MPI_Allreduce` / `MPI_Reduce_scatter_block` of the whole buffer (rsmpi
//!   `all_reduce_into` / `reduce_scatter_block_into`), and rsmpi's all-reduce bucket by bucket on
//!   preallocated buffers (what bucketing itself costs, without the backend's per-call copies).
//!
//! 64 MiB of gradients (64 tensors of 1 MiB), buckets of 1, 4 and 25 MiB. Reported: time per
//! reduction (slowest rank, median of the repetitions), algorithm bandwidth (bytes / time) and
//! bus bandwidth (the ring's per-rank traffic: 2(N−1)/N of the bytes for an all-reduce,
//! (N−1)/N for a reduce-scatter).
//!
//!   cargo bench --bench reduce                 # re-execs itself under `mpirun -np 2`
//!   REDUCE_NP=4 REDUCE_MIB=256 cargo bench --bench reduce
//!   mpirun -np 8 target/release/deps/reduce-<hash>   # under your own launcher

use std::process::Command;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};
use unlearn::dist::mpi::Mpi;
use unlearn::dist::zero::FlatLayout;
use unlearn::dist::Collective;
use unlearn::model::{ParamRole, ParamSpec};

const MIB: usize = 1024 * 1024;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Seconds of `f` on the slowest rank, median over `reps` after one warm-up.
fn time(comm: &dyn Collective, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut samples = vec![];
    for _ in 0..reps {
        comm.barrier().expect("barrier");
        let t = Instant::now();
        f();
        let mut s = [t.elapsed().as_secs_f64()];
        comm.all_reduce_max_f64(&mut s).expect("max");
        samples.push(s[0]);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    if std::env::var("OMPI_COMM_WORLD_SIZE").is_err() && std::env::var("PMI_SIZE").is_err() {
        // Not under a launcher: run this same binary under mpirun.
        let np = env_usize("REDUCE_NP", 2).to_string();
        let exe = std::env::current_exe().expect("own path");
        let args: Vec<String> = std::env::args().skip(1).collect();
        let status = Command::new("mpirun").args(["-np", &np]).arg(exe).args(&args).status().expect("spawn mpirun");
        std::process::exit(status.code().unwrap_or(1));
    }
    tch::set_num_threads(1);
    let comm = Mpi::init().expect("MPI init");
    let world = SimpleCommunicator::world();
    let (rank, n) = (comm.rank(), comm.world());
    let total_mib = env_usize("REDUCE_MIB", 64);
    let reps = env_usize("REDUCE_REPS", 9);
    let bytes = (total_mib * MIB) as f64;
    let elems = total_mib * MIB / 4;
    let specs: Vec<ParamSpec> = (0..total_mib)
        .map(|i| ParamSpec { name: format!("w{i}"), shape: vec![(MIB / 4) as i64], role: ParamRole::Matrix, layer: Some(0) })
        .collect();
    let refs: Vec<&ParamSpec> = specs.iter().collect();
    let ring_ar = 2.0 * (n as f64 - 1.0) / n as f64;
    let ring_rs = (n as f64 - 1.0) / n as f64;

    // Baselines: one MPI call on the whole buffer.
    let send = vec![1.0f32; elems];
    let mut recv = vec![0.0f32; elems];
    let t_ar = time(&comm, reps, || world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum()));
    let mut piece = vec![0.0f32; elems / n];
    let t_rs = time(&comm, reps, || world.reduce_scatter_block_into(&send[..elems / n * n], &mut piece[..], SystemOperation::sum()));
    drop((send, recv, piece));

    let mut lines = vec![];
    let gbs = |t: f64| bytes / t / 1e9;
    lines.push(format!(
        "{:<40} {:>8} {:>10} {:>10} {:>10} {:>9}",
        "operation (fp32, CPU)", "buckets", "ms", "alg GB/s", "bus GB/s", "vs plain"
    ));
    lines.push(format!(
        "{:<40} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9}",
        "MPI all_reduce_into, one buffer",
        1,
        t_ar * 1e3,
        gbs(t_ar),
        gbs(t_ar) * ring_ar,
        "1.00"
    ));
    lines.push(format!(
        "{:<40} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9}",
        "MPI reduce_scatter_block, one buffer",
        1,
        t_rs * 1e3,
        gbs(t_rs),
        gbs(t_rs) * ring_rs,
        "1.00"
    ));
    for bucket_mib in [1usize, 4, 25] {
        let layout = FlatLayout::new(&refs, n, (bucket_mib * MIB / 4) as i64);
        let mut full = Tensor::ones([layout.total], (Kind::Float, Device::Cpu));
        let t = time(&comm, reps, || layout.all_reduce_full(&comm, &mut full).expect("all_reduce_full"));
        lines.push(format!(
            "{:<40} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9.2}",
            format!("all_reduce_full, {bucket_mib} MiB buckets"),
            layout.buckets.len(),
            t * 1e3,
            gbs(t),
            gbs(t) * ring_ar,
            t_ar / t
        ));
        // The same bucketing through rsmpi directly, with a send buffer allocated once: tells the
        // cost of splitting into buckets apart from the per-call copies of the Collective path.
        let send = vec![1.0f32; layout.total as usize];
        let mut recv = vec![0.0f32; layout.total as usize];
        let t_raw = time(&comm, reps, || {
            for bk in &layout.buckets {
                let (a, b) = (bk.offset as usize, (bk.offset + bk.padded) as usize);
                world.all_reduce_into(&send[a..b], &mut recv[a..b], SystemOperation::sum());
            }
        });
        drop((send, recv));
        lines.push(format!(
            "{:<40} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9.2}",
            format!("  MPI all_reduce_into per {bucket_mib} MiB bucket"),
            layout.buckets.len(),
            t_raw * 1e3,
            gbs(t_raw),
            gbs(t_raw) * ring_ar,
            t_ar / t_raw
        ));
        let local = Tensor::ones([layout.total], (Kind::Float, Device::Cpu));
        let mut shard = Tensor::zeros([layout.shard_len()], (Kind::Float, Device::Cpu));
        let t = time(&comm, reps, || {
            for (b, bk) in layout.buckets.iter().enumerate() {
                layout.reduce_scatter_add(&comm, b, &local.narrow(0, bk.offset, bk.padded), &mut shard).expect("reduce_scatter_add");
            }
        });
        lines.push(format!(
            "{:<40} {:>8} {:>10.2} {:>10.2} {:>10.2} {:>9.2}",
            format!("reduce_scatter_add, {bucket_mib} MiB buckets"),
            layout.buckets.len(),
            t * 1e3,
            gbs(t),
            gbs(t) * ring_rs,
            t_rs / t
        ));
    }
    if rank == 0 {
        println!("gradient reduction over MPI: {total_mib} MiB fp32, {n} ranks, median of {reps} (slowest rank)");
        for l in lines {
            println!("{l}");
        }
        println!("vs plain: time of the one-buffer MPI call of the same kind / time of the bucketed path (< 1: slower)");
    }
    drop(comm);
    // MPI belongs to unlearn::dist::world, which finalizes it (after the communication thread ends).
    unlearn::dist::finalize();
}
