//! Every loss and its gradient w.r.t. the logits equals an independent PyTorch implementation of
//! algorithms.md on fixed tensors (random logits, a padded batch with masks).

mod common;

use common::*;
use tch::{Device, Kind, Tensor};
use unlearn::methods::losses::{self, NpoVariant};

#[test]
fn losses_and_gradients_match_pytorch_reference() {
    tch::manual_seed(42);
    let (b, t, v) = (3i64, 9i64, 17i64);
    let logits = Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 3.0;
    let teacher = &logits + Tensor::randn([b, t, v], (Kind::Float, Device::Cpu)) * 0.7;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, Device::Cpu));
    // Rows of 9, 6 and 4 real tokens (right padding); targets exclude the first 2 tokens (a prompt).
    let lens = [9i64, 6, 4];
    let amask = Tensor::from_slice(&(0..b * t).map(|i| (i % t < lens[(i / t) as usize]) as i64).collect::<Vec<_>>()).view([b, t]);
    let tmask = Tensor::from_slice(
        &(0..b * (t - 1)).map(|i| { let j = i % (t - 1) + 1; (j >= 2 && j < lens[(i / (t - 1)) as usize]) as i64 as f32 }).collect::<Vec<_>>(),
    )
    .view([b, t - 1]);
    // NPO reference sums slightly different from the model's so that the ratios are non-zero.
    let ref_sums = Tensor::from_slice(&[-20.0f32, -11.0, -4.5]);
    let n_targets = tmask.sum(Kind::Float).double_value(&[]);
    let (tol, beta) = (0.02, 0.3);

    let tmp = tempfile::tempdir().unwrap();
    let inp = tmp.path().join("in.safetensors");
    let out = tmp.path().join("out.safetensors");
    Tensor::write_safetensors(
        &[("logits", &logits), ("teacher", &teacher), ("input_ids", &ids), ("target_mask", &tmask), ("attention_mask", &amask), ("ref_sums", &ref_sums)],
        &inp,
    )
    .unwrap();
    let hp = format!(r#"{{"n_targets": {n_targets}, "n_sequences": {b}, "tol": {tol}, "npo_beta": {beta}}}"#);
    run_py("loss_ref.py", &[inp.to_str().unwrap(), &hp, out.to_str().unwrap()]);
    let reference: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();

    type LossFn<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, LossFn)> = vec![
        ("nll", Box::new(|z| losses::nll(&losses::target_logprobs(z, &ids, &tmask), n_targets))),
        ("nlul", Box::new(|z| losses::nlul(z, &ids, &tmask, tol, n_targets))),
        ("npo_standard", Box::new(|z| {
            let lp = losses::target_logprobs(z, &ids, &tmask);
            losses::npo(&lp, &ref_sums, beta, NpoVariant::Standard, b as f64, n_targets, t as f64)
        })),
        ("npo_mt", Box::new(|z| {
            let lp = losses::target_logprobs(z, &ids, &tmask);
            losses::npo(&lp, &ref_sums, beta, NpoVariant::MtUnlearn, b as f64, n_targets, t as f64)
        })),
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
