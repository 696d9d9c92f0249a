//! Flat layout and shard maps for ZeRO.
//!
//! Trainable parameters are laid end to end in one flat buffer, grouped into *buckets* of
//! consecutive parameters of the same layer (never more than `bucket_elems` elements unless one
//! parameter is larger; a parameter never spans buckets). Each bucket is padded to a multiple of
//! the shard count S, and shard r owns the r-th 1/S of every bucket — the FSDP "flat parameter per
//! unit" scheme. That makes every collective a per-bucket operation:
//! reduce-scatter a bucket's gradient as soon as backward has produced it, all-gather a layer's
//! buckets right before that layer runs (ZeRO-3), and compute norms as shard-local sums of squares
//! plus one small all-reduce. Padding elements are zero in every gradient and never read as
//! parameters.
//!
//! A rank's shard buffer is the concatenation of its slices of every bucket, in bucket order.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{Collective, Handle};
use crate::model::ParamSpec;
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatParam {
    pub name: String,
    pub shape: Vec<i64>,
    /// Offset in the full flat buffer.
    pub offset: i64,
    pub numel: i64,
    pub bucket: usize,
    pub layer: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Offset in the full flat buffer.
    pub offset: i64,
    /// Elements used by parameters.
    pub len: i64,
    /// `len` rounded up to a multiple of the shard count.
    pub padded: i64,
    pub layer: Option<usize>,
    /// Indices into `FlatLayout::params`.
    pub params: Range<usize>,
}

/// Where a run of a parameter lives in one rank's shard (for checkpoints and resharding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub param: String,
    /// Offset within the parameter (flattened).
    pub param_offset: i64,
    /// Offset within the rank's shard buffer.
    pub shard_offset: i64,
    pub len: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlatLayout {
    pub params: Vec<FlatParam>,
    pub buckets: Vec<Bucket>,
    /// Number of shards (1 for ZeRO-0: every rank owns everything).
    pub shards: usize,
    /// Full flat length, padding included.
    pub total: i64,
}

impl FlatLayout {
    pub fn new(specs: &[&ParamSpec], shards: usize, bucket_elems: i64) -> Self {
        let shards = shards.max(1);
        let mut params = vec![];
        let mut buckets: Vec<Bucket> = vec![];
        let mut offset = 0i64;
        let mut open: Option<Bucket> = None;
        let close = |b: Bucket, buckets: &mut Vec<Bucket>, offset: &mut i64| {
            let padded = (b.len + shards as i64 - 1) / shards as i64 * shards as i64;
            *offset = b.offset + padded;
            buckets.push(Bucket { padded, ..b });
        };
        for s in specs {
            let n = s.numel();
            let fits = open.as_ref().is_some_and(|b| b.layer == s.layer && b.len + n <= bucket_elems);
            if !fits {
                if let Some(b) = open.take() {
                    close(b, &mut buckets, &mut offset);
                }
                let i = params.len();
                open = Some(Bucket { offset, len: 0, padded: 0, layer: s.layer, params: i..i });
            }
            let b = open.as_mut().unwrap();
            params.push(FlatParam {
                name: s.name.clone(),
                shape: s.shape.clone(),
                offset: b.offset + b.len,
                numel: n,
                bucket: buckets.len(),
                layer: s.layer,
            });
            b.len += n;
            b.params.end += 1;
        }
        if let Some(b) = open.take() {
            close(b, &mut buckets, &mut offset);
        }
        FlatLayout { params, buckets, shards, total: offset }
    }

    /// Elements of one rank's shard.
    pub fn shard_len(&self) -> i64 {
        self.buckets.iter().map(|b| b.padded / self.shards as i64).sum()
    }

    /// Offset of bucket `b`'s slice within a shard buffer (the same on every rank).
    pub fn shard_offset(&self, b: usize) -> i64 {
        self.buckets[..b].iter().map(|b| b.padded / self.shards as i64).sum()
    }

    /// Full-buffer range owned by `rank` within bucket `b`: (start, len).
    pub fn owned(&self, b: usize, rank: usize) -> (i64, i64) {
        let bk = &self.buckets[b];
        let per = bk.padded / self.shards as i64;
        (bk.offset + rank as i64 * per, per)
    }

    /// Buckets of one layer (`None`: embeddings, final norm and head).
    pub fn layer_buckets(&self, layer: Option<usize>) -> Vec<usize> {
        (0..self.buckets.len()).filter(|&b| self.buckets[b].layer == layer).collect()
    }

    /// Full-buffer span `(start, len)` covering the given consecutive buckets.
    pub fn span(&self, buckets: &[usize]) -> (i64, i64) {
        match (buckets.first(), buckets.last()) {
            (Some(&a), Some(&b)) => {
                let start = self.buckets[a].offset;
                (start, self.buckets[b].offset + self.buckets[b].padded - start)
            }
            _ => (0, 0),
        }
    }

    /// Layers that own at least one bucket, in order (`None` last).
    pub fn layers(&self) -> Vec<Option<usize>> {
        let mut out: Vec<Option<usize>> = vec![];
        for b in &self.buckets {
            if !out.contains(&b.layer) {
                out.push(b.layer);
            }
        }
        out
    }

    /// The pieces of parameters that `rank`'s shard holds.
    pub fn segments(&self, rank: usize) -> Vec<Segment> {
        let mut out = vec![];
        for (bi, bk) in self.buckets.iter().enumerate() {
            let (start, len) = self.owned(bi, rank);
            let shard_base = self.shard_offset(bi);
            for p in &self.params[bk.params.clone()] {
                let lo = p.offset.max(start);
                let hi = (p.offset + p.numel).min(start + len);
                if lo < hi {
                    out.push(Segment {
                        param: p.name.clone(),
                        param_offset: lo - p.offset,
                        shard_offset: shard_base + (lo - start),
                        len: hi - lo,
                    });
                }
            }
        }
        out
    }

    /// This rank's shard of a full flat buffer (no communication).
    pub fn extract_shard(&self, full: &Tensor, rank: usize) -> Tensor {
        let pieces: Vec<Tensor> = (0..self.buckets.len())
            .map(|b| {
                let (start, len) = self.owned(b, rank);
                full.narrow(0, start, len)
            })
            .collect();
        Tensor::cat(&pieces, 0)
    }

    /// Write this rank's shard into its place in a full flat buffer (no communication).
    pub fn insert_shard(&self, shard: &Tensor, full: &mut Tensor, rank: usize) {
        for b in 0..self.buckets.len() {
            let (start, len) = self.owned(b, rank);
            full.narrow(0, start, len).copy_(&shard.narrow(0, self.shard_offset(b), len));
        }
    }

    /// All-gather the given buckets from every rank's shard into `dst`, which holds the full
    /// buffer from element `base` on (pass 0 for a whole flat buffer, or a layer's first bucket
    /// offset for a layer-sized buffer).
    pub fn gather_buckets(&self, comm: &dyn Collective, shard: &Tensor, dst: &mut Tensor, buckets: &[usize], base: i64) -> Result<()> {
        super::wait_all(self.start_gather_buckets(comm, shard, dst, buckets, base)?)
    }

    /// [`FlatLayout::gather_buckets`] issued without waiting: `dst` may be read once every
    /// returned handle has been waited on.
    pub fn start_gather_buckets(
        &self,
        comm: &dyn Collective,
        shard: &Tensor,
        dst: &Tensor,
        buckets: &[usize],
        base: i64,
    ) -> Result<Vec<Handle>> {
        let mut handles = vec![];
        for &b in buckets {
            let bk = &self.buckets[b];
            let per = bk.padded / self.shards as i64;
            let src = shard.narrow(0, self.shard_offset(b), per);
            let mut piece = dst.narrow(0, bk.offset - base, bk.padded);
            if self.shards == 1 {
                tch::no_grad(|| piece.copy_(&src)); // copy_ converts the dtype itself: no temporary
            } else {
                handles.push(comm.start_all_gather(src.to_kind(piece.kind()), piece)?);
            }
        }
        Ok(handles)
    }

    /// Sum a bucket's full-length local gradient over ranks and add this rank's slice of the
    /// result into `shard` (the ZeRO-2/3 gradient path).
    pub fn reduce_scatter_add(&self, comm: &dyn Collective, bucket: usize, local: &Tensor, shard: &mut Tensor) -> Result<()> {
        let bk = &self.buckets[bucket];
        let per = bk.padded / self.shards as i64;
        let mut dst = shard.narrow(0, self.shard_offset(bucket), per);
        if self.shards == 1 {
            let _ = dst.f_add_(local)?;
            return Ok(());
        }
        let mut piece = Tensor::empty([per], (local.kind(), local.device())); // fully overwritten
        comm.reduce_scatter_sum(local, &mut piece)?;
        let _ = dst.f_add_(&piece)?;
        Ok(())
    }

    /// All-reduce a full flat buffer bucket by bucket (the ZeRO-0/1 gradient path).
    pub fn all_reduce_full(&self, comm: &dyn Collective, full: &mut Tensor) -> Result<()> {
        if comm.world() == 1 {
            return Ok(());
        }
        for bk in &self.buckets {
            let mut piece = full.narrow(0, bk.offset, bk.padded);
            comm.all_reduce_sum(&mut piece)?;
        }
        Ok(())
    }
}

/// Elements per piece in [`dot`] and [`checksum`]: bounds their temporaries to a few tens of MB.
const PIECE: i64 = 1 << 22;

/// ⟨a, b⟩ of two flat fp32 buffers, accumulated in f64 piece by piece, so that no full-length
/// product or f64 copy is ever materialised (one host sync at the end).
pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    let n = a.numel() as i64;
    let mut acc = Tensor::zeros([], (Kind::Double, a.device()));
    let mut off = 0;
    while off < n {
        let len = PIECE.min(n - off);
        acc += (a.narrow(0, off, len) * b.narrow(0, off, len)).sum(Kind::Double);
        off += len;
    }
    acc.double_value(&[])
}

/// (Σx, Σx²) of a flat buffer in f64, piece by piece (replica consistency checks).
pub fn checksum(t: &Tensor) -> (f64, f64) {
    let n = t.numel() as i64;
    let mut sum = Tensor::zeros([], (Kind::Double, t.device()));
    let mut sq = Tensor::zeros([], (Kind::Double, t.device()));
    let mut off = 0;
    while off < n {
        let piece = t.narrow(0, off, PIECE.min(n - off)).to_kind(Kind::Double);
        sum += piece.sum(Kind::Double);
        sq += piece.square().sum(Kind::Double);
        off += PIECE;
    }
    (sum.double_value(&[]), sq.double_value(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamRole;

    fn spec(name: &str, n: i64, layer: Option<usize>) -> ParamSpec {
        ParamSpec { name: name.into(), shape: vec![n], role: ParamRole::Matrix, layer }
    }

    #[test]
    fn buckets_pad_to_shards_and_segments_cover_every_element_once() {
        let specs = [spec("a", 5, Some(0)), spec("b", 7, Some(0)), spec("c", 3, Some(1)), spec("d", 11, None)];
        let refs: Vec<&ParamSpec> = specs.iter().collect();
        for shards in 1..=4 {
            let l = FlatLayout::new(&refs, shards, 8);
            for b in &l.buckets {
                assert_eq!(b.padded % shards as i64, 0);
                assert!(b.len <= b.padded);
            }
            // a (5) alone (a+b > 8), b alone, c (other layer), d (larger than a bucket) alone.
            assert_eq!(l.buckets.len(), 4);
            let mut covered: std::collections::HashMap<String, Vec<bool>> =
                specs.iter().map(|s| (s.name.clone(), vec![false; s.numel() as usize])).collect();
            for r in 0..shards {
                for s in l.segments(r) {
                    for i in s.param_offset..s.param_offset + s.len {
                        let slot = &mut covered.get_mut(&s.param).unwrap()[i as usize];
                        assert!(!*slot, "element covered twice");
                        *slot = true;
                    }
                    assert!(s.shard_offset + s.len <= l.shard_len());
                }
            }
            assert!(covered.values().all(|v| v.iter().all(|&c| c)));
        }
    }

    #[test]
    fn extract_then_insert_round_trips() {
        let specs = [spec("a", 5, Some(0)), spec("b", 6, Some(0))];
        let refs: Vec<&ParamSpec> = specs.iter().collect();
        let l = FlatLayout::new(&refs, 3, 100);
        let full = Tensor::arange(l.total, (Kind::Float, tch::Device::Cpu));
        let mut back = Tensor::zeros([l.total], (Kind::Float, tch::Device::Cpu));
        for r in 0..3 {
            let shard = l.extract_shard(&full, r);
            assert_eq!(shard.numel() as i64, l.shard_len());
            l.insert_shard(&shard, &mut back, r);
        }
        assert!(back.equal(&full));
    }
}
