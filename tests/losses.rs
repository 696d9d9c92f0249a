//! Every loss and its gradient w.r.t. the logits equals an independent PyTorch implementation of
//! algorithms.md on fixed tensors (random logits, a padded batch with masks).

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use unlearn::methods::losses::{self, NpoVariant};

/// Shape of the fixed batch: 3 rows of 9 positions, vocabulary 17.
const B: i64 = 3;
const T: i64 = 9;
const V: i64 = 17;

/// Random logits (seed 42), ids, and right-padded masks: rows of 9, 6 and 4 real tokens whose
/// targets exclude the first 2 tokens (a prompt); a teacher near the logits. Returns (logits,
/// teacher, ids, attention mask, target mask).
fn fixed_batch() -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(42);
    let (b, t, v) = (B, T, V);
    let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 3.0;
    let teacher = &logits + Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 0.7;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    let lens = [9i64, 6, 4];
    let amask = Tensor::from_slice(&(0..b * t).map(|i| (i % t < lens[(i / t) as usize]) as i64).collect::<Vec<_>>()).view([b, t]);
    let tmask = Tensor::from_slice(
        &(0..b * (t - 1))
            .map(|i| {
                let j = i % (t - 1) + 1;
                (j >= 2 && j < lens[(i / (t - 1)) as usize]) as i64 as f32
            })
            .collect::<Vec<_>>(),
    )
    .view([b, t - 1]);
    (logits, teacher, ids, amask, tmask)
}

/// tests/py/loss_ref.py on (logits, teacher, input_ids, target_mask, attention_mask, ref_sums)
/// with the hyper-parameters `hp` (JSON): `<loss>.value` and `<loss>.grad` for every loss.
fn pytorch_reference(inputs: &[&Tensor; 6], hp: &str) -> std::collections::HashMap<String, Tensor> {
    let names = ["logits", "teacher", "input_ids", "target_mask", "attention_mask", "ref_sums"];
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("in.safetensors"), tmp.path().join("out.safetensors"));
    let named: Vec<(&str, &Tensor)> = names.iter().copied().zip(inputs.iter().copied()).collect();
    Tensor::write_safetensors(&named, &inp).unwrap();
    run_py("loss_ref.py", &[inp.to_str().unwrap(), hp, out.to_str().unwrap()]);
    Tensor::read_safetensors(&out).unwrap().into_iter().collect()
}

#[test]
fn losses_and_gradients_match_pytorch_reference() {
    let (b, t) = (B, T);
    let (logits, teacher, ids, amask, tmask) = fixed_batch();
    // NPO reference sums slightly different from the model's so that the ratios are non-zero.
    let ref_sums = Tensor::from_slice(&[-20.0f32, -11.0, -4.5]);
    let n_targets = tmask.sum(Kind::Float).double_value(&[]);
    let (tol, beta) = (0.02, 0.3);

    let hp = format!(r#"{{"n_targets": {n_targets}, "n_sequences": {b}, "tol": {tol}, "npo_beta": {beta}}}"#);
    let reference = pytorch_reference(&[&logits, &teacher, &ids, &tmask, &amask, &ref_sums], &hp);

    type LossFn<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, LossFn)> = vec![
        ("nll", Box::new(|z| losses::nll(&losses::target_logprobs(z, &ids, &tmask), n_targets))),
        ("nlul", Box::new(|z| losses::nlul(z, &ids, &tmask, tol, n_targets))),
        (
            "npo_standard",
            Box::new(|z| {
                let lp = losses::target_logprobs(z, &ids, &tmask);
                losses::npo(&lp, &ref_sums, beta, NpoVariant::Standard, b as f64, n_targets, t as f64)
            }),
        ),
        (
            "npo_mt",
            Box::new(|z| {
                let lp = losses::target_logprobs(z, &ids, &tmask);
                losses::npo(&lp, &ref_sums, beta, NpoVariant::MtUnlearn, b as f64, n_targets, t as f64)
            }),
        ),
        ("kl", Box::new(|z| losses::kl_to_teacher(z, &teacher, &amask, (b * t) as f64))),
        ("qkl", Box::new(|z| losses::qkl_to_teacher(z, &teacher, &amask, (b * t) as f64))),
    ];
    for (name, f) in &cases {
        let z = logits.detach().set_requires_grad(true);
        let loss = f(&z);
        let grad = Tensor::run_backward(&[&loss], &[&z], false, false).remove(0);
        let ref_value = reference[&format!("{name}.value")].double_value(&[0]);
        let ref_grad = &reference[&format!("{name}.grad")];
        let value_err = (loss.double_value(&[]) - ref_value).abs() / ref_value.abs().max(1e-12);
        let grad_err = (&grad - ref_grad).abs().max().double_value(&[]) / ref_grad.abs().max().double_value(&[]).max(1e-12);
        println!("{name}: value {:.6e} (ref {ref_value:.6e}), rel err value {value_err:.2e}, grad {grad_err:.2e}", loss.double_value(&[]));
        // NLUL's logged surrogate value is not the NLUL loss itself; only its gradient is specified.
        if *name != "nlul" {
            assert!(value_err < 1e-5, "{name}: value {} vs reference {ref_value}", loss.double_value(&[]));
        }
        assert!(grad_err < 1e-5, "{name}: gradient differs from reference by {grad_err:.3e} (relative)");
        assert!(ref_grad.abs().max().double_value(&[]) > 1e-6, "{name}: degenerate gradient");
    }
    // The surrogate has exactly the gradient of the true NLUL loss Σ −log(1 + tol − p) / N.
    let g_sur = &reference["nlul.grad"];
    let g_direct = &reference["nlul_direct.grad"];
    let err = (g_sur - g_direct).abs().max().double_value(&[]) / g_direct.abs().max().double_value(&[]);
    println!("nlul surrogate gradient vs gradient of -log(1+tol-p): rel err {err:.2e}");
    assert!(err < 1e-6, "NLUL surrogate gradient differs from the true loss's gradient ({err:.2e})");
}

/// The surrogate's logit gradient `Σ m·w·∇log p / N` for NLUL at `tol`, and the loss value.
fn nlul_grad(logits: &Tensor, ids: &Tensor, tmask: &Tensor, tol: f64, n_targets: f64) -> (f64, Tensor) {
    let z = logits.detach().set_requires_grad(true);
    let loss = losses::nlul(&z, ids, tmask, tol, n_targets);
    let grad = Tensor::run_backward(&[&loss], &[&z], false, false).remove(0);
    (loss.double_value(&[]), grad)
}

/// `method.tol = 0` is pure −log(1 − p): padded (off-target) positions, where p reads as 1, must not
/// turn the loss into NaN, and on targets the gradient is the true loss's (PyTorch, float64).
#[test]
fn nlul_with_tol_zero_is_finite_and_matches_pytorch() {
    let (b, t) = (B, T);
    let (logits, _, ids, amask, tmask) = fixed_batch();
    let n_targets = tmask.sum(Kind::Float).double_value(&[]);
    let ref_sums = Tensor::zeros([b], (Kind::Float, Device::Cpu));
    let hp = format!(r#"{{"n_targets": {n_targets}, "n_sequences": {b}, "tol": 0.0, "npo_beta": 0.1}}"#);
    let reference = pytorch_reference(&[&logits, &logits, &ids, &tmask, &amask, &ref_sums], &hp);

    let (value, grad) = nlul_grad(&logits, &ids, &tmask, 0.0, n_targets);
    assert!(value.is_finite(), "tol = 0 gives loss {value}");
    assert!(grad.isfinite().all().int64_value(&[]) == 1, "tol = 0 gives a non-finite gradient");
    // Padding really is present, so the masked positions were exercised.
    assert!(tmask.sum(Kind::Float).double_value(&[]) < (b * (t - 1)) as f64);
    for key in ["nlul.grad", "nlul_direct.grad"] {
        let g = &reference[key];
        let err = (&grad - g).abs().max().double_value(&[]) / g.abs().max().double_value(&[]);
        println!("tol = 0: loss {value:.6e}, gradient vs PyTorch {key}: rel err {err:.2e}");
        assert!(err < 1e-5, "tol = 0: gradient differs from PyTorch {key} by {err:.3e} (relative)");
    }

    // A memorised target whose fp32 log-prob rounds to exactly 0 (p = 1 to fp32 precision): the
    // weight p/(1 − p) is unrepresentable, yet the loss and gradient stay finite and the gradient
    // stays below the true loss's bound (|∂/∂z| ≤ 1/N per position).
    let sharp = logits.copy();
    let (row, pos) = (0i64, 3i64);
    let target = ids.int64_value(&[row, pos + 1]);
    let _ = sharp.get(row).get(pos).get(target).fill_(60.0);
    let lp = sharp.get(row).get(pos).log_softmax(-1, Kind::Float).double_value(&[target]);
    assert_eq!(lp, 0.0, "the constructed target's fp32 log-prob should round to 0");
    let (value, grad) = nlul_grad(&sharp, &ids, &tmask, 0.0, n_targets);
    let gmax = grad.abs().max().double_value(&[]);
    println!("tol = 0 with a p = 1 target: loss {value:.6e}, max |grad| {gmax:.3e} (bound 1/N = {:.3e})", 1.0 / n_targets);
    assert!(value.is_finite() && grad.isfinite().all().int64_value(&[]) == 1, "a p = 1 target makes tol = 0 non-finite");
    assert!(gmax <= 1.0 / n_targets * (1.0 + 1e-6), "gradient {gmax} exceeds the true loss's bound");
}
