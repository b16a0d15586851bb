//! Export of an [`Int8Model`] as a standard `.tflite` flatbuffer, so that
//! firmware running TensorFlow Lite Micro can run the very same model.
//!
//! The graph is one subgraph with three constant tensors and one operator:
//!
//! ```text
//! input  int8 [1, n_in]   scale/zero point = the model's input quantization
//!   │
//! FULLY_CONNECTED (fused activation NONE, weights format DEFAULT)
//!   ├─ weights int8  [n_out, n_in]  per-channel symmetric, quantized_dimension 0
//!   └─ bias    int32 [n_out]        scale input_scale * weight_scale[c], zero point 0
//!   ▼
//! output int8 [1, n_out]  the int8 logits (argmax = the class)
//! ```
//!
//! Standardization and input quantization are *not* in the graph: firmware
//! applies `q = clamp(round(((x - mean) / std) / scale) + zero_point)` with
//! the values stored in the edgeloop artifact (`docs/models.md`), exactly as
//! [`Int8Model::quantize_input`] does.
//!
//! The flatbuffer is written with the `flatbuffers` crate's builder, field by
//! field, following TensorFlow's `schema.fbs` (schema version 3, file
//! identifier `TFL3`). The vtable slot of field number `n` is `4 + 2n`.

use super::Int8Model;
use flatbuffers::{FlatBufferBuilder, WIPOffset};

/// TFLite `TensorType`.
const TENSOR_INT32: i8 = 2;
const TENSOR_INT8: i8 = 9;
/// TFLite `BuiltinOperator::FULLY_CONNECTED`.
const OP_FULLY_CONNECTED: i32 = 9;
/// TFLite `BuiltinOptions::FullyConnectedOptions` (union type tag).
const OPTIONS_FULLY_CONNECTED: u8 = 8;
/// The schema version TFLite readers expect in `Model.version`.
const SCHEMA_VERSION: u32 = 3;

/// vtable slot of field number `n`.
const fn slot(n: u16) -> u16 {
    4 + 2 * n
}

// Field numbers from schema.fbs.
mod model {
    pub const VERSION: u16 = 0;
    pub const OPERATOR_CODES: u16 = 1;
    pub const SUBGRAPHS: u16 = 2;
    pub const DESCRIPTION: u16 = 3;
    pub const BUFFERS: u16 = 4;
}
mod operator_code {
    pub const DEPRECATED_BUILTIN_CODE: u16 = 0;
    pub const VERSION: u16 = 2;
    pub const BUILTIN_CODE: u16 = 3;
}
mod subgraph {
    pub const TENSORS: u16 = 0;
    pub const INPUTS: u16 = 1;
    pub const OUTPUTS: u16 = 2;
    pub const OPERATORS: u16 = 3;
    pub const NAME: u16 = 4;
}
mod tensor {
    pub const SHAPE: u16 = 0;
    pub const TYPE: u16 = 1;
    pub const BUFFER: u16 = 2;
    pub const NAME: u16 = 3;
    pub const QUANTIZATION: u16 = 4;
}
mod quantization {
    pub const SCALE: u16 = 2;
    pub const ZERO_POINT: u16 = 3;
    pub const QUANTIZED_DIMENSION: u16 = 6;
}
mod operator {
    pub const OPCODE_INDEX: u16 = 0;
    pub const INPUTS: u16 = 1;
    pub const OUTPUTS: u16 = 2;
    pub const BUILTIN_OPTIONS_TYPE: u16 = 3;
    pub const BUILTIN_OPTIONS: u16 = 4;
}
mod fc_options {
    pub const FUSED_ACTIVATION_FUNCTION: u16 = 0;
}
mod buffer {
    pub const DATA: u16 = 0;
}

struct TensorSpec<'a> {
    shape: Vec<i32>,
    ty: i8,
    buffer: u32,
    name: &'a str,
    scales: Vec<f32>,
    zero_points: Vec<i64>,
}

impl Int8Model {
    /// The model as a `.tflite` file (int8 input → FULLY_CONNECTED → int8
    /// output), runnable by TensorFlow Lite Micro with bit-identical
    /// outputs to [`Int8Model::logits_quantized`].
    pub fn to_tflite(&self) -> Vec<u8> {
        let n_in = self.n_inputs() as i32;
        let n_out = self.classes.len() as i32;
        let mut fbb =
            FlatBufferBuilder::with_capacity(1024 + self.weights.len() + 8 * self.bias.len());

        // Buffers: 0 is the empty sentinel every .tflite starts with; 1 the
        // weights, 2 the bias; the input and output tensors use buffer 0.
        let weight_bytes: Vec<u8> = self.weights.iter().map(|w| *w as u8).collect();
        let bias_bytes: Vec<u8> = self.bias.iter().flat_map(|b| b.to_le_bytes()).collect();
        let buffers: Vec<_> = [&[][..], &weight_bytes[..], &bias_bytes[..]]
            .iter()
            .map(|data| {
                let data = if data.is_empty() {
                    None
                } else {
                    // A vector's payload follows its 4-byte length, so it is
                    // 4-byte aligned: enough for the int32 bias TFLM reads
                    // in place.
                    Some(fbb.create_vector(data))
                };
                let start = fbb.start_table();
                if let Some(data) = data {
                    fbb.push_slot_always(slot(buffer::DATA), data);
                }
                fbb.end_table(start)
            })
            .collect();

        let bias_scales: Vec<f32> = self
            .weight_scales
            .iter()
            .map(|s| self.input.scale * s)
            .collect();
        let zeros = vec![0i64; self.weight_scales.len()];
        let specs = [
            TensorSpec {
                shape: vec![1, n_in],
                ty: TENSOR_INT8,
                buffer: 0,
                name: "features",
                scales: vec![self.input.scale],
                zero_points: vec![i64::from(self.input.zero_point)],
            },
            TensorSpec {
                shape: vec![n_out, n_in],
                ty: TENSOR_INT8,
                buffer: 1,
                name: "weights",
                scales: self.weight_scales.clone(),
                zero_points: zeros.clone(),
            },
            TensorSpec {
                shape: vec![n_out],
                ty: TENSOR_INT32,
                buffer: 2,
                name: "bias",
                scales: bias_scales,
                zero_points: zeros,
            },
            TensorSpec {
                shape: vec![1, n_out],
                ty: TENSOR_INT8,
                buffer: 0,
                name: "logits",
                scales: vec![self.output.scale],
                zero_points: vec![i64::from(self.output.zero_point)],
            },
        ];
        let tensors: Vec<_> = specs
            .iter()
            .map(|spec| write_tensor(&mut fbb, spec))
            .collect();

        let options = {
            let start = fbb.start_table();
            // ActivationFunctionType NONE = 0 (the default, written anyway).
            fbb.push_slot_always::<i8>(slot(fc_options::FUSED_ACTIVATION_FUNCTION), 0);
            fbb.end_table(start)
        };
        let op_inputs = fbb.create_vector(&[0i32, 1, 2]);
        let op_outputs = fbb.create_vector(&[3i32]);
        let op = {
            let start = fbb.start_table();
            fbb.push_slot_always::<u32>(slot(operator::OPCODE_INDEX), 0);
            fbb.push_slot_always(slot(operator::INPUTS), op_inputs);
            fbb.push_slot_always(slot(operator::OUTPUTS), op_outputs);
            fbb.push_slot_always::<u8>(
                slot(operator::BUILTIN_OPTIONS_TYPE),
                OPTIONS_FULLY_CONNECTED,
            );
            fbb.push_slot_always(slot(operator::BUILTIN_OPTIONS), options);
            fbb.end_table(start)
        };

        let tensors = fbb.create_vector(&tensors);
        let sg_inputs = fbb.create_vector(&[0i32]);
        let sg_outputs = fbb.create_vector(&[3i32]);
        let operators = fbb.create_vector(&[op]);
        let sg_name = fbb.create_string("main");
        let subgraph = {
            let start = fbb.start_table();
            fbb.push_slot_always(slot(subgraph::TENSORS), tensors);
            fbb.push_slot_always(slot(subgraph::INPUTS), sg_inputs);
            fbb.push_slot_always(slot(subgraph::OUTPUTS), sg_outputs);
            fbb.push_slot_always(slot(subgraph::OPERATORS), operators);
            fbb.push_slot_always(slot(subgraph::NAME), sg_name);
            fbb.end_table(start)
        };

        let opcode = {
            let start = fbb.start_table();
            fbb.push_slot_always::<i8>(
                slot(operator_code::DEPRECATED_BUILTIN_CODE),
                OP_FULLY_CONNECTED as i8,
            );
            // FULLY_CONNECTED version 4 is the int8 (per-channel capable) kernel.
            fbb.push_slot_always::<i32>(slot(operator_code::VERSION), 4);
            fbb.push_slot_always::<i32>(slot(operator_code::BUILTIN_CODE), OP_FULLY_CONNECTED);
            fbb.end_table(start)
        };

        let opcodes = fbb.create_vector(&[opcode]);
        let subgraphs = fbb.create_vector(&[subgraph]);
        let description = fbb.create_string(&format!(
            "edgeloop int8 classifier: {} features -> {} classes ({})",
            n_in,
            n_out,
            self.classes.join(",")
        ));
        let buffers = fbb.create_vector(&buffers);
        let root = {
            let start = fbb.start_table();
            fbb.push_slot_always::<u32>(slot(model::VERSION), SCHEMA_VERSION);
            fbb.push_slot_always(slot(model::OPERATOR_CODES), opcodes);
            fbb.push_slot_always(slot(model::SUBGRAPHS), subgraphs);
            fbb.push_slot_always(slot(model::DESCRIPTION), description);
            fbb.push_slot_always(slot(model::BUFFERS), buffers);
            fbb.end_table(start)
        };
        fbb.finish(root, Some("TFL3"));
        fbb.finished_data().to_vec()
    }
}

fn write_tensor<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    spec: &TensorSpec<'_>,
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let scale = fbb.create_vector(&spec.scales);
    let zero_point = fbb.create_vector(&spec.zero_points);
    let quant = {
        let start = fbb.start_table();
        fbb.push_slot_always(slot(quantization::SCALE), scale);
        fbb.push_slot_always(slot(quantization::ZERO_POINT), zero_point);
        fbb.push_slot_always::<i32>(slot(quantization::QUANTIZED_DIMENSION), 0);
        fbb.end_table(start)
    };
    let shape = fbb.create_vector(&spec.shape);
    let name = fbb.create_string(spec.name);
    let start = fbb.start_table();
    fbb.push_slot_always(slot(tensor::SHAPE), shape);
    fbb.push_slot_always::<i8>(slot(tensor::TYPE), spec.ty);
    fbb.push_slot_always::<u32>(slot(tensor::BUFFER), spec.buffer);
    fbb.push_slot_always(slot(tensor::NAME), name);
    fbb.push_slot_always(slot(tensor::QUANTIZATION), quant);
    fbb.end_table(start)
}
