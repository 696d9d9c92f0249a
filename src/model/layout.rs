//! The parameter list of a model, written once: which weights a config's model has, their HF
//! names, shapes and roles, in HF order. Everything else derives from it: [`param_specs`] (loading,
//! saving, the flat training layout, the planner's sizes, ONNX weight order), the model's storage
//! and its visitors (`Llama::new`, `shallow_copy`, `visit_layer_params_mut`).
//!
//! Each weight has a [`Slot`] saying what the forward does with it, so the forward asks for
//! "the query projection of layer 3" rather than for a struct field that some families lack.

use super::config::Config;

/// What a parameter is for. The `matrices` trainable set (and the frozen set of the mean-teacher
/// recipe, "everything but Matrix") is the attention and MLP matrices; biases and norms (q/k
/// norms included) are trained only with `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    Embedding,
    Head,
    Norm,
    Matrix,
    Bias,
}

/// Name (the HF tensor name), shape and role of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub role: ParamRole,
    /// Transformer block index, `None` for embeddings, final norm and head.
    pub layer: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// What the forward does with a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Embed,
    FinalNorm,
    Head,
    InputNorm,
    Q,
    QBias,
    K,
    KBias,
    V,
    VBias,
    /// Phi-3's fused `[q; k; v]` projection.
    Qkv,
    QNorm,
    KNorm,
    O,
    OBias,
    PostNorm,
    Gate,
    GateBias,
    Up,
    UpBias,
    /// Phi-3's fused `[gate; up]` projection.
    GateUp,
    Down,
    DownBias,
}

pub const SLOTS: usize = Slot::DownBias as usize + 1;

/// One parameter of the layout: for block parameters `name` follows `model.layers.{l}.`.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDesc {
    pub slot: Slot,
    pub name: String,
    pub shape: Vec<i64>,
    pub role: ParamRole,
}

/// A model's parameters in HF order: `before` the blocks (embeddings), one `block` (the same for
/// every layer), `after` the blocks (final norm, untied head).
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub before: Vec<ParamDesc>,
    pub block: Vec<ParamDesc>,
    pub after: Vec<ParamDesc>,
    pub layers: usize,
}

impl Layout {
    pub fn new(cfg: &Config) -> Layout {
        let (d, i, v, e) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim);
        let q_out = cfg.num_attention_heads * e;
        let kv_out = cfg.num_key_value_heads * e;
        let desc = |slot, name: &str, shape: &[i64], role| ParamDesc { slot, name: name.to_string(), shape: shape.to_vec(), role };
        // A linear layer: its `[out, in]` weight, then its bias if the config has one.
        let linear = |out: &mut Vec<ParamDesc>, (w, b): (Slot, Slot), name: &str, rows: i64, cols: i64, bias: bool| {
            out.push(desc(w, &format!("{name}.weight"), &[rows, cols], ParamRole::Matrix));
            if bias {
                out.push(desc(b, &format!("{name}.bias"), &[rows], ParamRole::Bias));
            }
        };

        let mut block = vec![desc(Slot::InputNorm, "input_layernorm.weight", &[d], ParamRole::Norm)];
        if cfg.fused_projections {
            linear(&mut block, (Slot::Qkv, Slot::QBias), "self_attn.qkv_proj", q_out + 2 * kv_out, d, false);
        } else {
            linear(&mut block, (Slot::Q, Slot::QBias), "self_attn.q_proj", q_out, d, cfg.qkv_bias);
            linear(&mut block, (Slot::K, Slot::KBias), "self_attn.k_proj", kv_out, d, cfg.qkv_bias);
            linear(&mut block, (Slot::V, Slot::VBias), "self_attn.v_proj", kv_out, d, cfg.qkv_bias);
        }
        linear(&mut block, (Slot::O, Slot::OBias), "self_attn.o_proj", d, q_out, cfg.o_bias);
        if cfg.qk_norm {
            block.push(desc(Slot::QNorm, "self_attn.q_norm.weight", &[e], ParamRole::Norm));
            block.push(desc(Slot::KNorm, "self_attn.k_norm.weight", &[e], ParamRole::Norm));
        }
        block.push(desc(Slot::PostNorm, "post_attention_layernorm.weight", &[d], ParamRole::Norm));
        if cfg.fused_projections {
            linear(&mut block, (Slot::GateUp, Slot::GateBias), "mlp.gate_up_proj", 2 * i, d, false);
        } else {
            linear(&mut block, (Slot::Gate, Slot::GateBias), "mlp.gate_proj", i, d, cfg.mlp_bias);
            linear(&mut block, (Slot::Up, Slot::UpBias), "mlp.up_proj", i, d, cfg.mlp_bias);
        }
        linear(&mut block, (Slot::Down, Slot::DownBias), "mlp.down_proj", d, i, cfg.mlp_bias);

        let before = vec![desc(Slot::Embed, "model.embed_tokens.weight", &[v, d], ParamRole::Embedding)];
        let mut after = vec![desc(Slot::FinalNorm, "model.norm.weight", &[d], ParamRole::Norm)];
        if !cfg.tie_word_embeddings {
            after.push(desc(Slot::Head, "lm_head.weight", &[v, d], ParamRole::Head));
        }
        Layout { before, block, after, layers: cfg.num_hidden_layers as usize }
    }

    /// The HF name of a block parameter in layer `l`.
    pub fn block_name(l: usize, desc: &ParamDesc) -> String {
        format!("model.layers.{l}.{}", desc.name)
    }

    /// Every parameter, in HF order (embeddings, blocks, norm, head).
    pub fn specs(&self) -> Vec<ParamSpec> {
        let outer = |d: &ParamDesc| ParamSpec { name: d.name.clone(), shape: d.shape.clone(), role: d.role, layer: None };
        let mut out: Vec<ParamSpec> = self.before.iter().map(outer).collect();
        for l in 0..self.layers {
            out.extend(self.block.iter().map(|d| ParamSpec {
                name: Self::block_name(l, d),
                shape: d.shape.clone(),
                role: d.role,
                layer: Some(l),
            }));
        }
        out.extend(self.after.iter().map(outer));
        out
    }

    /// Where each slot sits: its index in a block's parameters, or in `before ++ after`.
    pub fn positions(&self) -> [Option<usize>; SLOTS] {
        let mut pos = [None; SLOTS];
        for (i, d) in self.block.iter().enumerate() {
            pos[d.slot as usize] = Some(i);
        }
        for (i, d) in self.before.iter().chain(&self.after).enumerate() {
            pos[d.slot as usize] = Some(i);
        }
        pos
    }
}

/// All parameters of a model with this config, in HF order (embeddings, blocks, norm, head).
/// With tied embeddings there is no `lm_head.weight`.
pub fn param_specs(cfg: &Config) -> Vec<ParamSpec> {
    Layout::new(cfg).specs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Family;

    fn names(cfg: &Config) -> Vec<String> {
        Layout::new(cfg).block.iter().map(|d| d.name.clone()).collect()
    }

    #[test]
    fn llama_block_order_is_the_historic_one() {
        let cfg = Config::llama2_7b();
        assert_eq!(
            names(&cfg),
            [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ]
        );
        let specs = param_specs(&cfg);
        assert_eq!(specs.len(), 1 + 9 * 32 + 2);
        assert_eq!(specs[0].name, "model.embed_tokens.weight");
        assert_eq!(specs[10].name, "model.layers.1.input_layernorm.weight");
        assert_eq!(specs.last().unwrap().name, "lm_head.weight");
    }

    #[test]
    fn families_add_their_parts_and_every_slot_is_placed_once() {
        let qwen2 = Config::qwen2_5_7b();
        assert!(names(&qwen2).contains(&"self_attn.k_proj.bias".to_string()));
        assert!(!names(&qwen2).contains(&"self_attn.o_proj.bias".to_string()));
        let qwen3 = Config { family: Family::Qwen3, qk_norm: true, qkv_bias: false, ..Config::qwen2_5_7b() };
        assert!(names(&qwen3).contains(&"self_attn.q_norm.weight".to_string()));
        let phi = Config::phi3_5_mini();
        assert_eq!(names(&phi).iter().filter(|n| n.contains("proj")).count(), 4);
        let gate_up = Layout::new(&phi).block.into_iter().find(|d| d.slot == Slot::GateUp).unwrap();
        assert_eq!(gate_up.shape, [2 * 8192, 3072]);
        for cfg in [Config::llama2_7b(), qwen2, qwen3, phi, Config::zephyr_7b_beta()] {
            let layout = Layout::new(&cfg);
            let mut slots: Vec<usize> = layout.block.iter().chain(&layout.before).chain(&layout.after).map(|d| d.slot as usize).collect();
            let n = slots.len();
            slots.sort();
            slots.dedup();
            assert_eq!(slots.len(), n, "{:?}: a slot appears twice", cfg.family);
        }
    }
}
