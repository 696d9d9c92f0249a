//! `model.onnx` on disk, weights streamed from the checkpoint one tensor at a time.
//!
//! External: initializers reference `model.onnx.data`, written by [`super::external`].
//! Inline (models below the 2 GB protobuf limit): the protobuf is written as it would be
//! encoded, but each weight's `raw_data` is streamed into the file instead of being held in the
//! message. Every length prefix is computed from the declared shapes first, which is why the
//! graph field is assembled by hand here.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

use super::external::{data_offsets, external_tensor, stream_weights, write_data_file, FetchWeight};
use super::graph::WeightDecl;
use super::proto::ModelProto;
use crate::error::{IoContext, Result};

pub const MODEL_FILE: &str = "model.onnx";
pub const DATA_FILE: &str = "model.onnx.data";

/// A serialized protobuf must stay below 2 GiB; onnx itself switches to external data at 2 GB.
pub const MAX_INLINE_BYTES: u64 = 2_000_000_000;

/// `ModelProto.graph` and `GraphProto.initializer`, `TensorProto.raw_data` field numbers.
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightStorage {
    Inline,
    External,
}

/// Write `dir/model.onnx` (and `dir/model.onnx.data` when external). `model.graph` holds the
/// nodes and inline constants; `weights` are appended as initializers in order.
pub fn write_model(
    dir: &Path,
    mut model: ModelProto,
    weights: &[WeightDecl],
    storage: WeightStorage,
    fetch: &mut FetchWeight,
) -> Result<()> {
    let path = dir.join(MODEL_FILE);
    match storage {
        WeightStorage::External => {
            let graph = model.graph.as_mut().expect("a model has a graph");
            for (w, off) in weights.iter().zip(data_offsets(weights)) {
                graph.initializer.push(external_tensor(w, DATA_FILE, off));
            }
            let bytes = model.encode_to_vec();
            let mut f = File::create(&path).at(&path)?;
            f.write_all(&bytes).at(&path)?;
            f.sync_all().at(&path)?;
            write_data_file(&dir.join(DATA_FILE), weights, fetch)
        }
        WeightStorage::Inline => write_inline(&path, model, weights, fetch),
    }
}

fn len_delimited(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn write_inline(path: &Path, mut model: ModelProto, weights: &[WeightDecl], fetch: &mut FetchWeight) -> Result<()> {
    let graph = model.graph.take().expect("a model has a graph");
    // Each initializer = its metadata fields + a raw_data field of known length.
    let metas: Vec<Vec<u8>> = weights.iter().map(|w| w.tensor_proto().encode_to_vec()).collect();
    let tensor_lens: Vec<usize> =
        metas.iter().zip(weights).map(|(m, w)| m.len() + len_delimited(TENSOR_RAW_DATA, w.byte_len() as usize)).collect();
    let graph_head = graph.encode_to_vec();
    let graph_len = graph_head.len() + tensor_lens.iter().map(|&n| len_delimited(GRAPH_INITIALIZER, n)).sum::<usize>();

    let mut head = model.encode_to_vec();
    encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut head);
    encode_varint(graph_len as u64, &mut head);
    head.extend_from_slice(&graph_head);
    stream_weights(path, &head, weights, fetch, |i, w| {
        let mut frame = Vec::with_capacity(metas[i].len() + 24);
        encode_key(GRAPH_INITIALIZER, WireType::LengthDelimited, &mut frame);
        encode_varint(tensor_lens[i] as u64, &mut frame);
        frame.extend_from_slice(&metas[i]);
        encode_key(TENSOR_RAW_DATA, WireType::LengthDelimited, &mut frame);
        encode_varint(w.byte_len(), &mut frame);
        frame
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::graph::GraphBuilder;
    use crate::export::proto::{data_type, Dim, GraphProto, TensorProto};

    /// The streamed encoding decodes to the same message prost would have encoded in one piece.
    #[test]
    fn inline_streaming_equals_whole_message_encoding() {
        let mut b = GraphBuilder::new(21);
        let x = b.input("x", data_type::FLOAT, &[Dim::Named("n"), Dim::Fixed(3)]);
        let w = b.weight("w", &[2, 3], data_type::FLOAT);
        let w2 = b.weight("w2", &[200, 2], data_type::FLOAT);
        let y = b.linear(&x, &w);
        b.op_into("Gemm", &[&y, &w2], "y", vec![crate::export::graph::attr_int("transB", 1)]);
        b.output("y", data_type::FLOAT, &[Dim::Named("n"), Dim::Fixed(200)]);
        let (graph, weights) = b.finish("g");
        let model = ModelProto { ir_version: 10, graph: Some(graph.clone()), ..Default::default() };
        let values: Vec<Vec<f32>> = weights.iter().map(|w| (0..w.dims.iter().product::<i64>()).map(|i| i as f32 * 0.5).collect()).collect();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut k = 0;
        let mut fetch = |w: &WeightDecl| {
            k += 1;
            Ok(tch::Tensor::from_slice(&values[k - 1]).view(w.dims.as_slice()))
        };
        write_model(&dir, model.clone(), &weights, WeightStorage::Inline, &mut fetch).unwrap();
        let decoded = ModelProto::decode(std::fs::read(dir.join(MODEL_FILE)).unwrap().as_slice()).unwrap();
        let mut expect: GraphProto = graph;
        for (w, v) in weights.iter().zip(&values) {
            expect.initializer.push(TensorProto { raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(), ..w.tensor_proto() });
        }
        assert_eq!(decoded, ModelProto { graph: Some(expect), ..model });
    }
}
