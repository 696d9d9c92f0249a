//! ONNX external data: where each weight lives in `model.onnx.data` and the streaming writer
//! that puts it there.
//!
//! Offsets are multiples of 4096 (onnx.proto: "SHOULD be multiples of the page size to enable
//! mmap") and depend only on the declared shapes, so the graph can reference the file before a
//! single weight is read. `location` is relative to the model file, which is how onnxruntime
//! resolves it (never the working directory).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use tch::Tensor;

use super::graph::WeightDecl;
use super::proto::{StringStringEntryProto, TensorProto, DATA_LOCATION_EXTERNAL};
use crate::error::{Error, IoContext, Result};
use crate::model::weights::tensor_bytes;
use crate::progress::Progress;

pub const DATA_ALIGNMENT: u64 = 4096;

/// Supplies one weight, as a contiguous CPU tensor in the export dtype.
pub type FetchWeight<'a> = dyn FnMut(&WeightDecl) -> Result<Tensor> + 'a;

/// Start offset of each weight in the data file, in declaration order.
pub fn data_offsets(weights: &[WeightDecl]) -> Vec<u64> {
    let mut end = 0u64;
    weights
        .iter()
        .map(|w| {
            let start = end.div_ceil(DATA_ALIGNMENT) * DATA_ALIGNMENT;
            end = start + w.byte_len();
            start
        })
        .collect()
}

/// The initializer that points at `location` (relative to the model file) at `offset`.
pub fn external_tensor(w: &WeightDecl, location: &str, offset: u64) -> TensorProto {
    TensorProto {
        external_data: vec![
            StringStringEntryProto::new("location", location),
            StringStringEntryProto::new("offset", offset.to_string()),
            StringStringEntryProto::new("length", w.byte_len().to_string()),
        ],
        data_location: DATA_LOCATION_EXTERNAL,
        ..w.tensor_proto()
    }
}

/// Fetch one weight and check that its bytes are exactly what the graph declared.
pub fn fetch_checked(fetch: &mut FetchWeight, w: &WeightDecl) -> Result<Tensor> {
    let t = fetch(w)?;
    let n = t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
    if t.size() != w.dims || n != w.byte_len() {
        return Err(crate::other!(
            "weight `{}`: got {:?} ({n} bytes), the graph declares {:?} ({} bytes)",
            w.name,
            t.size(),
            w.dims,
            w.byte_len()
        ));
    }
    Ok(t)
}

/// Stream every weight into `path` at its offset, one tensor in memory at a time.
pub fn write_data_file(path: &Path, weights: &[WeightDecl], fetch: &mut FetchWeight) -> Result<()> {
    let offsets = data_offsets(weights);
    let mut end = 0u64;
    stream_weights(path, &[], weights, fetch, |i, w| {
        let padding = vec![0u8; (offsets[i] - end) as usize];
        end = offsets[i] + w.byte_len();
        padding
    })
}

/// Write `head`, then for each weight the bytes `before(i, weight)` returns followed by the
/// weight's own bytes (fetched one at a time), then fsync.
pub fn stream_weights(
    path: &Path,
    head: &[u8],
    weights: &[WeightDecl],
    fetch: &mut FetchWeight,
    mut before: impl FnMut(usize, &WeightDecl) -> Vec<u8>,
) -> Result<()> {
    let mut out = BufWriter::with_capacity(1 << 22, File::create(path).at(path)?);
    out.write_all(head).at(path)?;
    let bar = Progress::new(weights.len() as u64, "export");
    for (i, w) in weights.iter().enumerate() {
        let t = fetch_checked(fetch, w)?;
        out.write_all(&before(i, w)).at(path)?;
        out.write_all(tensor_bytes(&t)).at(path)?;
        bar.inc(1);
    }
    bar.finish();
    let file = out.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().at(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::proto::data_type;

    #[test]
    fn offsets_are_page_aligned_and_do_not_overlap() {
        let w = |n: i64| WeightDecl { name: format!("w{n}"), dims: vec![n], data_type: data_type::FLOAT };
        let ws = [w(10), w(1024), w(1025), w(1)];
        let off = data_offsets(&ws);
        assert_eq!(off, vec![0, 4096, 8192, 8192 + 8192]);
        for (i, o) in off.iter().enumerate() {
            assert_eq!(o % DATA_ALIGNMENT, 0);
            if i > 0 {
                assert!(off[i - 1] + ws[i - 1].byte_len() <= *o);
            }
        }
    }
}
