//! Gathering variable-length results from every rank, built on `broadcast_bytes` alone so that it
//! works with any backend: each rank in turn broadcasts its bytes, so afterwards every rank holds
//! every rank's bytes. Meant for evaluation results (kilobytes to a few megabytes), not tensors.

use super::Collective;
use crate::Result;

/// Every rank's `mine`, in rank order, on every rank.
pub fn all_gather_bytes(comm: &dyn Collective, mine: Vec<u8>) -> Result<Vec<Vec<u8>>> {
    let world = comm.world();
    if world == 1 {
        return Ok(vec![mine]);
    }
    let rank = comm.rank();
    let mut mine = Some(mine);
    let mut out = Vec::with_capacity(world);
    for root in 0..world {
        let mut buf = if root == rank { mine.take().unwrap_or_default() } else { Vec::new() };
        comm.broadcast_bytes(&mut buf, root)?;
        out.push(buf);
    }
    Ok(out)
}

/// Values that travel as one little-endian 64-bit word each (bit-exact for f64).
pub trait Word: Copy {
    fn to_word(self) -> u64;
    fn from_word(w: u64) -> Self;
}

impl Word for i64 {
    fn to_word(self) -> u64 {
        self as u64
    }
    fn from_word(w: u64) -> Self {
        w as i64
    }
}

impl Word for f64 {
    fn to_word(self) -> u64 {
        self.to_bits()
    }
    fn from_word(w: u64) -> Self {
        f64::from_bits(w)
    }
}

/// Gather `(index, values)` items computed by the ranks into one list of length `n` indexed by
/// item, on every rank. Each index must be produced by exactly one rank.
pub fn all_gather_indexed<T: Word>(comm: &dyn Collective, mine: &[(usize, Vec<T>)], n: usize) -> Result<Vec<Vec<T>>> {
    let mut bytes = Vec::new();
    for (index, values) in mine {
        bytes.extend_from_slice(&(*index as u64).to_le_bytes());
        bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            bytes.extend_from_slice(&v.to_word().to_le_bytes());
        }
    }
    let mut out: Vec<Option<Vec<T>>> = vec![None; n];
    for (rank, buf) in all_gather_bytes(comm, bytes)?.into_iter().enumerate() {
        let mut words = buf.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        while let Some(index) = words.next() {
            let len = words.next().ok_or_else(|| crate::Error::Dist(format!("rank {rank}: truncated result record")))?;
            let values: Vec<T> = words.by_ref().take(len as usize).map(T::from_word).collect();
            if values.len() != len as usize {
                return Err(crate::Error::Dist(format!("rank {rank}: truncated result record")));
            }
            let slot = out
                .get_mut(index as usize)
                .ok_or_else(|| crate::Error::Dist(format!("rank {rank}: result index {index} out of range {n}")))?;
            if slot.replace(values).is_some() {
                return Err(crate::Error::Dist(format!("result {index} produced by two ranks")));
            }
        }
    }
    out.into_iter().enumerate().map(|(i, v)| v.ok_or_else(|| crate::Error::Dist(format!("no rank produced result {i}")))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_gather_round_trips_bits() {
        let comm = super::super::local::Local;
        let items = vec![(1usize, vec![f64::NAN, -0.0, 1e-310]), (0, vec![]), (2, vec![std::f64::consts::PI])];
        let out = all_gather_indexed(&comm, &items, 3).unwrap();
        assert!(out[0].is_empty());
        assert_eq!(out[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), items[0].1.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(out[2], vec![std::f64::consts::PI]);
        assert!(all_gather_indexed::<i64>(&comm, &[(0, vec![1])], 2).is_err());
    }
}
