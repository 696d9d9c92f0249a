//! A small ONNX graph builder: nodes with unique readable names, deduplicated inline constants,
//! weight declarations whose bytes are streamed in later by the writer, graph inputs/outputs.
//!
//! Ops whose signature changed across the opsets we accept ([`MIN_OPSET`]..=[`MAX_OPSET`]) are
//! wrapped here (`reduce_mean_last`), so the model builder never looks at the opset.

use std::collections::HashMap;

use super::proto::{attribute_type, data_type, tensor_value_info, AttributeProto, Dim, GraphProto, NodeProto, TensorProto, ValueInfoProto};

/// Shape(start, end) needs opset 15.
pub const MIN_OPSET: i64 = 15;
/// onnxruntime 1.30/1.31 (CPU) rejects default-domain opsets above 26.
pub const MAX_OPSET: i64 = 26;

/// A weight initializer: declared while the graph is built, its bytes written afterwards by
/// streaming the checkpoint (so the graph never holds weight data).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightDecl {
    /// The HF tensor name, unchanged (stable names from checkpoint to ONNX).
    pub name: String,
    pub dims: Vec<i64>,
    pub data_type: i32,
}

impl WeightDecl {
    pub fn byte_len(&self) -> u64 {
        self.dims.iter().product::<i64>() as u64 * elem_size(self.data_type) as u64
    }

    /// The initializer without data; the writer adds `raw_data` or `external_data`.
    pub fn tensor_proto(&self) -> TensorProto {
        TensorProto { dims: self.dims.clone(), data_type: self.data_type, name: self.name.clone(), ..Default::default() }
    }
}

/// Bytes per element of the data types we write.
pub fn elem_size(dt: i32) -> usize {
    match dt {
        data_type::FLOAT => 4,
        data_type::FLOAT16 => 2,
        data_type::INT64 => 8,
        data_type::BOOL => 1,
        other => panic!("elem_size: data type {other} is not used by the exporter"),
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i: Some(v), r#type: attribute_type::INT, ..Default::default() }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f: Some(v), r#type: attribute_type::FLOAT, ..Default::default() }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: v.to_vec(), r#type: attribute_type::INTS, ..Default::default() }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: name.into(), t: Some(t), r#type: attribute_type::TENSOR, ..Default::default() }
}

/// An inline tensor from little-endian bytes.
pub fn raw_tensor(name: &str, data_type: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto { dims: dims.to_vec(), data_type, name: name.into(), raw_data: raw, ..Default::default() }
}

/// Little-endian bytes of `v` as fp32 or fp16.
pub fn float_bytes(v: &[f32], dt: i32) -> Vec<u8> {
    match dt {
        data_type::FLOAT => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        data_type::FLOAT16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        other => panic!("float_bytes: data type {other} is not a float type"),
    }
}

pub struct GraphBuilder {
    opset: i64,
    nodes: Vec<NodeProto>,
    constants: Vec<TensorProto>,
    /// (data type, dims, bytes) -> constant name, so repeated shapes/scalars are stored once.
    constant_names: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
    weights: Vec<WeightDecl>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    scope: String,
    counter: usize,
}

impl GraphBuilder {
    pub fn new(opset: i64) -> Self {
        assert!((MIN_OPSET..=MAX_OPSET).contains(&opset), "opset {opset} was validated by the caller");
        GraphBuilder {
            opset,
            nodes: vec![],
            constants: vec![],
            constant_names: HashMap::new(),
            weights: vec![],
            inputs: vec![],
            outputs: vec![],
            scope: String::new(),
            counter: 0,
        }
    }

    /// Prefix for the names of the nodes added next (e.g. `model.layers.3.self_attn`).
    pub fn set_scope(&mut self, scope: &str) {
        self.scope = scope.to_string();
    }

    /// Add a node with `n_outputs` fresh outputs, named after the node.
    pub fn node(&mut self, op: &str, inputs: &[&str], n_outputs: usize, attrs: Vec<AttributeProto>) -> Vec<String> {
        self.counter += 1;
        let name = format!("/{}/{op}_{}", self.scope, self.counter);
        let outputs: Vec<String> = (0..n_outputs).map(|i| format!("{name}:{i}")).collect();
        self.push_node(op, name, inputs, outputs.clone(), attrs);
        outputs
    }

    /// Add a single-output node; returns the output name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.node(op, inputs, 1, attrs).remove(0)
    }

    /// Add a single-output node whose output has a given name (graph outputs).
    pub fn op_into(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) {
        self.counter += 1;
        let name = format!("/{}/{op}_{}", self.scope, self.counter);
        self.push_node(op, name, inputs, vec![output.to_string()], attrs);
    }

    fn push_node(&mut self, op: &str, name: String, inputs: &[&str], output: Vec<String>, attrs: Vec<AttributeProto>) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output,
            name,
            op_type: op.to_string(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn constant(&mut self, data_type: i32, dims: &[i64], raw: Vec<u8>) -> String {
        let key = (data_type, dims.to_vec(), raw);
        if let Some(name) = self.constant_names.get(&key) {
            return name.clone();
        }
        let name = format!("const_{}", self.constant_names.len());
        self.constants.push(raw_tensor(&name, data_type, dims, key.2.clone()));
        self.constant_names.insert(key, name.clone());
        name
    }

    /// An inline int64 constant (shapes, axes, indices).
    pub fn const_i64(&mut self, dims: &[i64], values: &[i64]) -> String {
        self.constant(data_type::INT64, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An inline float constant of type `dt` (fp32 or fp16).
    pub fn const_float(&mut self, dt: i32, dims: &[i64], values: &[f32]) -> String {
        self.constant(dt, dims, float_bytes(values, dt))
    }

    /// A scalar float constant of type `dt`.
    pub fn scalar(&mut self, dt: i32, v: f32) -> String {
        self.const_float(dt, &[], &[v])
    }

    /// Declare a weight; its bytes are written later, in declaration order.
    pub fn weight(&mut self, name: &str, dims: &[i64], data_type: i32) -> String {
        self.weights.push(WeightDecl { name: name.to_string(), dims: dims.to_vec(), data_type });
        name.to_string()
    }

    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.inputs.push(tensor_value_info(name, elem_type, dims));
        name.to_string()
    }

    pub fn output(&mut self, name: &str, elem_type: i32, dims: &[Dim]) {
        self.outputs.push(tensor_value_info(name, elem_type, dims));
    }

    // ---- ops with opset-dependent or verbose signatures ----

    pub fn reshape(&mut self, x: &str, shape: &str) -> String {
        self.op("Reshape", &[x, shape], vec![])
    }

    /// Reshape to a constant shape (0 = copy that input dim, -1 = infer).
    pub fn reshape_to(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.const_i64(&[shape.len() as i64], shape);
        self.reshape(x, &s)
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    pub fn cast(&mut self, x: &str, to: i32) -> String {
        self.op("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.const_i64(&[axes.len() as i64], axes);
        self.op("Unsqueeze", &[x, &a], vec![])
    }

    pub fn squeeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.const_i64(&[axes.len() as i64], axes);
        self.op("Squeeze", &[x, &a], vec![])
    }

    /// Mean over the last axis, kept as size 1 (ReduceMean took `axes` as an attribute before opset 18).
    pub fn reduce_mean_last(&mut self, x: &str) -> String {
        if self.opset >= 18 {
            let a = self.const_i64(&[1], &[-1]);
            self.op("ReduceMean", &[x, &a], vec![attr_int("keepdims", 1)])
        } else {
            self.op("ReduceMean", &[x], vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)])
        }
    }

    /// Dims `start..end` of `x`'s shape as a 1-D int64 tensor.
    pub fn shape_slice(&mut self, x: &str, start: i64, end: i64) -> String {
        self.op("Shape", &[x], vec![attr_int("start", start), attr_int("end", end)])
    }

    /// `y = x · wᵀ` for `x [n, in]` and an HF `nn.Linear` weight `w [out, in]`, without storing a
    /// transposed copy of the weight (Gemm's `transB`; onnxruntime prepacks it at load).
    pub fn linear(&mut self, x: &str, w: &str) -> String {
        self.op("Gemm", &[x, w], vec![attr_int("transB", 1)])
    }

    /// The finished graph (constants as initializers; weights returned separately, in
    /// declaration order, for the writer to stream).
    pub fn finish(self, name: &str) -> (GraphProto, Vec<WeightDecl>) {
        let graph = GraphProto {
            node: self.nodes,
            name: name.to_string(),
            initializer: self.constants,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        (graph, self.weights)
    }
}
