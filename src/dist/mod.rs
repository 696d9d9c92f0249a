//! Distribution: ranks, collectives and sharding. Model and method code never import this.

/// This process's rank as the launcher advertises it (Open MPI, MPICH/PMI, Slurm, torchrun),
/// readable before MPI is initialised; 0 when not launched by any of them.
pub fn env_rank() -> usize {
    for key in ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "RANK"] {
        if let Some(r) = std::env::var(key).ok().and_then(|v| v.parse().ok()) {
            return r;
        }
    }
    0
}
