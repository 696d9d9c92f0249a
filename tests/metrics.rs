//! The metrics module against the Python reference (rouge_score + nltk, sklearn, scipy, numpy,
//! the MUSE and legacy TOFU formulas), on deterministic pseudo-random and hand-picked inputs that
//! the test generates, writes to JSON and hands to tests/py/metrics_ref.py in the same run.
//!
//! Run: `cargo test --release --test metrics -- --nocapture` (prints the max deviation per metric).

mod common;

use std::collections::BTreeSet;
use std::sync::OnceLock;

use serde_json::{json, Value};
use unlearn::data::formats::read_json_values;
use unlearn::eval::metrics::{
    hmean, ks_2samp, min_k_score, muse_auc, privleak, roc_auc, roc_curve, rouge_l, tofu, KsMethod, MinKRounding, PorterStemmer,
    RougeTokenizer, AUC_RETRAIN_BOOKS, AUC_RETRAIN_NEWS,
};

/// splitmix64: a fixed, dependency-free stream of test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn normals(&mut self, n: usize, mu: f64, sd: f64) -> Vec<f64> {
        (0..n).map(|_| mu + sd * self.normal()).collect()
    }
    /// Heavy ties: values on a 1/4 grid.
    fn grid(&mut self, n: usize, mu: f64) -> Vec<f64> {
        (0..n).map(|_| ((mu + self.normal()) * 4.0).round() / 4.0).collect()
    }
}

/// A JSON file as one array (the dataset layouts via the crate's own loader: one array, one
/// array per line as TOFU `full.json`, or JSON lines).
fn read_json(path: std::path::PathBuf) -> Value {
    Value::Array(read_json_values(&path).unwrap_or_else(|e| panic!("{e}")))
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.as_array().unwrap().iter().filter_map(|x| x.get(key).and_then(Value::as_str)).map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// Inputs

fn rouge_cases(rng: &mut Rng) -> Vec<(String, String)> {
    let mut cases: Vec<(String, String)> = [
        ("", ""),
        ("", "something here"),
        ("something here", ""),
        ("!!! ... ???", "--- ,,, ;;;"),
        ("Hello, world!", "hello world"),
        ("Café crème brûlée à la française", "cafe creme brulee a la francaise"),
        ("東京は日本の首都です Tokyo", "Tokyo 東京"),
        ("I ❤️ NY 🗽🚀 rocks", "i ny rocks 🎉"),
        ("300 \u{212A} is the temperature", "300 k is the temperature"),
        ("\u{130}stanbul and \u{131}zmir", "i stanbul and zmir"),
        ("ΣΊΣΥΦΟΣ Straße ﬁnance ＦＵＬＬ", "sisyphus strasse finance full"),
        ("Yes", "yes"),
        ("Yes", "No"),
        ("a", "a"),
        ("running runs ran runner", "run running runs"),
        ("generously generous generosity", "generous generously"),
        ("caresses ponies ties caress cats", "caress pony tie cat"),
        ("sky skies dying lying tying news innings", "skies sky die lie tie news inning"),
        ("a an the is it of to in", "the is of a"),
        ("08/09/1956 1,000,000 3.14", "1956 08 09 3 14"),
        ("don't can't won't it's", "dont cant wont its"),
        ("Basil Mahfouz Al-Kuwaiti", "basil mahfouz al kuwaiti"),
        ("the the the the", "the"),
        ("line one\nline two\ttabbed\r\nline three", "line one line two tabbed line three"),
        ("relational conditional rational valenci hesitanci digitizer", "relate condition rational"),
        ("feudalism decisiveness hopefulness callousness formaliti sensitiviti", "feudal decisive hopeful"),
        ("triplicate formative formalize electriciti electrical hopeful goodness", "triplic form formal"),
        ("revival allowance inference airliner gyroscopic adjustable defensible", "reviv allow infer"),
        ("irritant replacement adjustment dependent adoption homologou communism", "irrit replac adjust"),
        ("activate angulariti homologous effective bowdlerize probate rate cease controll roll", "activ angular"),
        (
            "agreed feed plastered bled motoring sing conflated troubled sized hopping tanned falling hissing fizzed failing filing",
            "agre feed plaster",
        ),
        ("happy sky enjoy spy fly try spied tried flies", "happi sky enjoy"),
        ("analogousli vileli radicalli differentli conformabli", "analog vile radic"),
        ("archaeology theology biology hopefulli", "archaeolog theolog biolog hope"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();

    // Very different lengths.
    let long: String = (0..300).map(|i| format!("word{} ", i % 37)).collect();
    cases.push(("word5".into(), long.clone()));
    cases.push((long.clone(), "word5 word7".into()));

    // Real TOFU answers vs their paraphrases and perturbations.
    let tofu = read_json(common::shared_data().join("tofu/forget01_perturbed.json"));
    for item in tofu.as_array().unwrap() {
        let answer = item["answer"].as_str().unwrap().to_string();
        let para = item["paraphrased_answer"].as_str().unwrap().to_string();
        cases.push((answer.clone(), para.clone()));
        for pert in item["perturbed_answer"].as_array().unwrap() {
            cases.push((answer.clone(), pert.as_str().unwrap().to_string()));
        }
        cases.push((para, item["perturbed_answer"][0].as_str().unwrap().to_string()));
    }

    // MUSE VerbMem-sized texts (~500 chars): true continuation vs the end of the prompt.
    let verbmem = read_json(common::shared_data().join("muse/news/verbmem/forget.json"));
    for item in verbmem.as_array().unwrap().iter().take(15) {
        let gt = item["gt"].as_str().unwrap().to_string();
        let prompt: Vec<char> = item["prompt"].as_str().unwrap().chars().collect();
        let tail: String = prompt[prompt.len().saturating_sub(600)..].iter().collect();
        cases.push((gt, tail));
    }

    // Word salad from a small vocabulary: non-trivial LCS, repeated and stemmable tokens.
    let vocab = [
        "the",
        "The",
        "author",
        "authors",
        "wrote",
        "writing",
        "books",
        "book",
        "in",
        "1956,",
        "Kuwait",
        "city",
        "cities",
        "é",
        "fiction",
        "fictional",
        "a",
        "of",
        "born",
        "was",
    ];
    for _ in 0..60 {
        let pick = |rng: &mut Rng, n: usize| (0..n).map(|_| vocab[rng.below(vocab.len())]).collect::<Vec<_>>().join(" ");
        let (la, lb) = (1 + rng.below(40), 1 + rng.below(40));
        cases.push((pick(rng, la), pick(rng, lb)));
    }
    cases
}

/// Every distinct rouge token of the TOFU and MUSE texts we ship, plus the stemmer's edge words.
fn stem_vocabulary() -> Vec<String> {
    let data = common::shared_data();
    let mut texts: Vec<String> = Vec::new();
    let full = read_json(data.join("tofu/full.json"));
    texts.extend(strings(&full, "question"));
    texts.extend(strings(&full, "answer"));
    for name in ["real_authors_perturbed.json", "world_facts_perturbed.json"] {
        texts.extend(strings(&read_json(data.join("tofu").join(name)), "answer"));
    }
    let verbmem = read_json(data.join("muse/news/verbmem/forget.json"));
    texts.extend(strings(&verbmem, "gt"));
    texts.extend(strings(&verbmem, "prompt"));
    for corpus in ["news", "books"] {
        let qa = read_json(data.join(format!("muse/{corpus}/knowmem/forget_qa.json")));
        texts.extend(strings(&qa, "question"));
        texts.extend(strings(&qa, "answer"));
    }
    let privleak = read_json(data.join("muse/news/privleak/forget.json"));
    texts.extend(privleak.as_array().unwrap().iter().filter_map(Value::as_str).map(str::to_string));

    let tok = RougeTokenizer::new(false);
    let mut words: BTreeSet<String> = texts.iter().flat_map(|t| tok.tokenize(t)).collect();
    for w in [
        "y",
        "yy",
        "yyy",
        "yyyy",
        "syzygy",
        "toy",
        "ay",
        "by",
        "ies",
        "ied",
        "ties",
        "tied",
        "dies",
        "died",
        "lies",
        "sses",
        "eed",
        "feed",
        "agreed",
        "bleed",
        "ing",
        "sing",
        "singing",
        "ed",
        "bled",
        "alli",
        "logi",
        "fulli",
        "bli",
        "abli",
        "ization",
        "ational",
        "tional",
        "ousli",
        "entli",
        "eli",
        "ss",
        "s",
        "is",
        "as",
        "us",
        "yes",
        "eye",
        "aye",
        "yea",
        "quay",
        "queueing",
        "skying",
        "spied",
        "ional",
        "ion",
        "sion",
        "tion",
        "ment",
        "ement",
        "ent",
        "xxxx",
        "aaaa",
        "abcdefghijklmnopqrstuvwxyz",
        "12345",
        "4th",
        "1950s",
        "mp3s",
        "ll",
        "all",
        "ball",
        "controll",
        "installation",
        "hopefulli",
    ] {
        words.insert(w.to_string());
    }
    words.into_iter().collect()
}

fn auc_cases(rng: &mut Rng) -> Vec<(Vec<bool>, Vec<f64>)> {
    let mut cases = Vec::new();
    for i in 0..40 {
        let n = 2 + rng.below(300);
        let p = 0.1 + 0.8 * rng.uniform();
        let mut labels: Vec<bool> = (0..n).map(|_| rng.uniform() < p).collect();
        labels[0] = true;
        labels[1] = false;
        let scores: Vec<f64> = if i % 2 == 0 {
            labels.iter().map(|&l| rng.normal() + if l { 0.7 } else { 0.0 }).collect()
        } else {
            labels.iter().map(|&l| ((rng.normal() + if l { 0.5 } else { 0.0 }) * 2.0).round() / 2.0).collect()
        };
        cases.push((labels, scores));
    }
    cases.push((vec![true, false], vec![0.3, 0.3]));
    cases.push((vec![true, false, true, false], vec![1.0; 4]));
    cases.push((vec![true, true, false, false], vec![2.0, 3.0, 0.0, 1.0]));
    cases.push((vec![true, true, false, false], vec![0.0, 1.0, 2.0, 3.0]));
    cases.push((vec![false, true, false, true, false], vec![-0.0, 0.0, 0.0, -1.0, 5.0]));
    let n = 5000;
    let labels: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
    let scores: Vec<f64> = labels.iter().map(|&l| (rng.normal() + if l { 0.2 } else { 0.0 }).round()).collect();
    cases.push((labels, scores));
    cases.push((vec![true; 3], vec![0.1, 0.5, 0.2]));
    cases.push((vec![false; 3], vec![0.1, 0.5, 0.2]));
    cases
}

fn ks_cases(rng: &mut Rng) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut cases = Vec::new();
    for &(n1, n2) in &[(40, 40), (200, 200), (400, 400), (40, 37), (37, 40)] {
        for shift in [0.0, 0.3, 0.8, 2.5] {
            cases.push((rng.normals(n1, 0.0, 1.0), rng.normals(n2, shift, 1.0)));
            cases.push((rng.grid(n1, 0.0), rng.grid(n2, shift)));
        }
        // Truth-ratio-like values (exp of a normal), heavy ties from 2-decimal rounding.
        let tr = |rng: &mut Rng, n: usize, mu: f64| -> Vec<f64> {
            (0..n).map(|_| ((mu + 0.5 * rng.normal()).exp() * 100.0).round() / 100.0).collect()
        };
        cases.push((tr(rng, n1, 0.0), tr(rng, n2, 0.2)));
    }
    // Interleaved samples: the smallest non-zero D (h = 1), where P(D >= h/lcm) is ~1 and scipy's
    // exact value may round just above 1 (it then falls back to the asymptotic method).
    for n in [40usize, 200, 400, 10_000] {
        cases.push(((0..n).map(|i| i as f64).collect(), (0..n).map(|i| i as f64 + 0.5).collect()));
    }
    cases.push(((0..40).map(|i| i as f64).collect(), (0..37).map(|i| i as f64 * 40.0 / 37.0 + 0.01).collect()));
    // Degenerate and small cases.
    cases.push((vec![1.0; 40], vec![1.0; 40]));
    cases.push((vec![1.0; 40], vec![2.0; 40]));
    cases.push(((0..40).map(f64::from).collect(), (100..137).map(f64::from).collect()));
    cases.push((vec![0.5], vec![0.25]));
    cases.push((vec![0.5], vec![0.25, 0.75, 1.0]));
    cases.push((vec![1.0, 2.0, 3.0, 4.0, 5.0], vec![1.0, 2.0, 3.0, 4.0, 5.0]));
    cases.push((rng.grid(7, 0.0), rng.grid(3, 0.0)));
    cases.push((rng.normals(1000, 0.0, 1.0), rng.normals(999, 0.1, 1.0)));
    cases.push((rng.normals(3000, 0.0, 1.0), rng.normals(2000, 0.05, 1.2)));
    // The largest exact sizes.
    cases.push((rng.normals(10_000, 0.0, 1.0), rng.normals(10_000, 0.03, 1.0)));
    cases.push((rng.grid(10_000, 0.0), rng.grid(9_999, 0.02)));
    // Asymptotic: max(n1, n2) > 10000, effective n from 1 to ~6000, across kstwo's branches.
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(10_001, 0.0, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(10_001, 0.02, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(10_001, 0.06, 1.0)));
    cases.push((rng.normals(12_000, 0.0, 1.0), rng.normals(11_000, 0.3, 1.0)));
    cases.push((rng.grid(15_000, 0.0), rng.grid(8_000, 0.05)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(130, 0.0, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(130, 0.4, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(500, 0.1, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), rng.normals(20, 0.0, 1.0)));
    cases.push((rng.normals(20_000, 0.0, 1.0), rng.normals(3, 0.0, 1.0)));
    cases.push((rng.normals(10_001, 0.0, 1.0), vec![5.0]));
    cases
}

/// (d, n) for kstwo.sf: every branch of scipy's `_kolmogn` survival function.
fn kstwo_grid() -> Vec<(f64, u64)> {
    let mut grid = Vec::new();
    for n in [1u64, 2, 3, 7, 10, 50, 100, 140, 141, 200, 1000, 5000, 10_000, 100_000, 100_001, 2_000_000] {
        let nf = n as f64;
        let rt = nf.sqrt();
        let ds = [
            1e-4,
            1e-3,
            0.3 / nf,
            0.6 / nf,
            0.9 / nf,
            1.0 / nf,
            1.5 / nf,
            3.0 / nf,
            0.3 / rt,
            0.5 / rt,
            0.8 / rt,
            1.0 / rt,
            1.2 / rt,
            1.5 / rt,
            2.0 / rt,
            3.0 / rt,
            5.0 / rt,
            10.0 / rt,
            20.0 / rt,
            0.1,
            0.3,
            0.5,
            0.7,
            1.0 - 1.0 / nf,
            1.0 - 0.5 / nf,
            0.9999,
        ];
        for d in ds {
            if d > 0.0 && d < 1.0 {
                grid.push((d, n));
            }
        }
    }
    grid
}

fn smirnov_grid() -> Vec<(f64, i64)> {
    let mut grid = Vec::new();
    for n in [1i64, 2, 5, 10, 11, 50, 141, 1000, 5000, 100_000, 2_000_000] {
        let nf = n as f64;
        for d in [
            0.5 / nf,
            1.0 / nf,
            2.0 / nf,
            3.0 / nf,
            0.1 / nf.sqrt(),
            0.5 / nf.sqrt(),
            1.0 / nf.sqrt(),
            2.0 / nf.sqrt(),
            4.0 / nf.sqrt(),
            0.05,
            0.2,
            0.5,
            0.9,
            1.0 - 1.0 / nf,
            1.0 - 0.5 / nf,
        ] {
            if d > 0.0 && d < 1.0 {
                grid.push((d, n));
            }
        }
    }
    grid
}

fn hmean_cases(rng: &mut Rng) -> Vec<Vec<f64>> {
    let mut cases: Vec<Vec<f64>> = (0..20).map(|_| (0..9).map(|_| rng.uniform()).collect()).collect();
    cases.push(vec![0.5, 0.0, 0.7, 0.9, 0.1, 0.3, 0.2, 0.8, 0.4]);
    cases.push(vec![0.5, 1e-300, 0.7]);
    cases.push(vec![1.0; 9]);
    cases.push(vec![0.4]);
    cases.push(vec![0.3, -0.1, 0.5]);
    cases.push(vec![]);
    cases.push((0..1000).map(|_| 0.01 + rng.uniform()).collect());
    cases
}

fn mink_cases(rng: &mut Rng) -> Vec<(Vec<f64>, f64)> {
    let mut cases = Vec::new();
    for i in 0..40 {
        let n = rng.below(400);
        let lp: Vec<f64> =
            (0..n).map(|_| if i % 4 == 0 { -(rng.below(5) as f64) } else { -(-rng.uniform().max(1e-12).ln()) * 3.0 }).collect();
        let k = [0.05, 0.1, 0.2, 0.4, 0.6, 1.0][i % 6];
        cases.push((lp, k));
    }
    cases.push((vec![-1.0], 0.4));
    cases.push((vec![-1.0, -2.0], 0.4));
    cases.push((vec![-1.0, -2.0, -0.5], 0.4));
    cases
}

/// Per-question losses of an "unlearned" and a "retain" model on a 40/200-question forget set.
fn tofu_cases(rng: &mut Rng) -> Vec<Value> {
    let mut cases = Vec::new();
    for (q, shift) in [(40usize, 0.0), (40, 0.6), (200, 0.2), (400, 0.05)] {
        let model = |rng: &mut Rng, extra: f64| {
            let para: Vec<f64> = (0..q).map(|_| (1.0 + extra + 0.4 * rng.normal()).abs()).collect();
            let pert: Vec<Vec<f64>> = (0..q).map(|_| (0..5).map(|_| (1.6 + 0.4 * rng.normal()).abs()).collect()).collect();
            json!({"para": para, "pert": pert})
        };
        let unlearn = model(rng, shift);
        let retain = model(rng, 0.0);
        let mut utility9: Vec<f64> = (0..9).map(|_| 0.05 + 0.9 * rng.uniform()).collect();
        if shift == 0.6 {
            utility9[4] = 0.0;
        }
        cases.push(json!({"unlearn": unlearn, "retain": retain, "utility9": utility9}));
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Running the reference once for all tests

struct Reference {
    cases: Value,
    out: Value,
}

fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let mut rng = Rng(20240611);
        let rouge: Vec<Value> = rouge_cases(&mut rng).into_iter().map(|(r, p)| json!({"reference": r, "prediction": p})).collect();
        let auc: Vec<Value> = auc_cases(&mut rng)
            .into_iter()
            .map(|(l, s)| json!({"labels": l.iter().map(|&b| b as u8).collect::<Vec<_>>(), "scores": s}))
            .collect();
        let muse: Vec<Value> = (0..12)
            .map(|i| {
                let (nf, nh) = if i < 10 { (100, 100) } else { (37, 5) };
                let gap = [0.0, 0.1, 0.5, 2.0, -0.3][i % 5];
                let mut forget = rng.normals(nf, 2.0 + gap, 0.5);
                let holdout = rng.normals(nh, 2.0, 0.5);
                if i % 3 == 0 {
                    forget.iter_mut().for_each(|x| *x = (*x * 10.0).round() / 10.0);
                }
                json!({"forget": forget, "holdout": holdout})
            })
            .collect();
        let ks: Vec<Value> = ks_cases(&mut rng).into_iter().map(|(a, b)| json!({"a": a, "b": b})).collect();
        let kstwo: Vec<Value> = kstwo_grid().into_iter().map(|(d, n)| json!({"d": d, "n": n})).collect();
        let smirnov: Vec<Value> = smirnov_grid().into_iter().map(|(d, n)| json!({"d": d, "n": n})).collect();
        let mink: Vec<Value> = mink_cases(&mut rng).into_iter().map(|(lp, k)| json!({"logprobs": lp, "k": k})).collect();
        let cases = json!({
            "rouge": rouge,
            "stem": stem_vocabulary(),
            "auc": auc,
            "muse_auc": muse,
            "ks": ks,
            "kstwo": kstwo,
            "smirnov": smirnov,
            "hmean": hmean_cases(&mut rng),
            "mink": mink,
            "tofu": tofu_cases(&mut rng),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let (inp, outp) = (dir.path().join("cases.json"), dir.path().join("reference.json"));
        std::fs::write(&inp, serde_json::to_vec(&cases).unwrap()).unwrap();
        let t0 = std::time::Instant::now();
        common::run_py("metrics_ref.py", &[inp.to_str().unwrap(), outp.to_str().unwrap()]);
        println!("reference computed in {:.1} s", t0.elapsed().as_secs_f64());
        let text = std::fs::read_to_string(&outp).expect("reference output");
        let out: Value = serde_json::from_str(&text).expect("reference output is JSON");
        println!("reference versions: {}", out["versions"]);
        Reference { cases, out }
    })
}

/// A float the reference wrote as repr() (None -> None).
fn pf(v: &Value) -> Option<f64> {
    v.as_str().map(|s| s.parse::<f64>().unwrap_or_else(|e| panic!("bad float {s:?}: {e}")))
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

impl Reference {
    /// (input case, reference result) pairs of one section.
    fn section<'a>(&'a self, name: &str) -> impl Iterator<Item = (&'a Value, &'a Value)> {
        self.cases[name].as_array().unwrap().iter().zip(self.out[name].as_array().unwrap())
    }
}

/// The largest relative deviation seen so far; fails as soon as one exceeds `tol`.
struct MaxDev {
    max: f64,
    tol: f64,
}

impl MaxDev {
    fn new(tol: f64) -> Self {
        MaxDev { max: 0.0, tol }
    }
    fn check(&mut self, got: f64, want: f64, what: impl std::fmt::Display) {
        let dev = rel_dev(got, want);
        self.max = self.max.max(dev);
        assert!(dev <= self.tol, "{what}: ours {got:e}, reference {want:e} (relative deviation {dev:e} > {:e})", self.tol);
    }
}

/// Relative deviation, 0 when both are NaN or equal (incl. both infinite), inf when only one is NaN.
fn rel_dev(a: f64, b: f64) -> f64 {
    if a.is_nan() && b.is_nan() || a == b {
        return 0.0;
    }
    if a.is_nan() || b.is_nan() {
        return f64::INFINITY;
    }
    (a - b).abs() / a.abs().max(b.abs())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn rouge_l_matches_rouge_score_with_and_without_stemmer() {
    let r = reference();
    let mut dev = MaxDev::new(1e-12);
    let mut n = 0;
    for (c, o) in r.section("rouge") {
        n += 1;
        let (reference_text, prediction) = (c["reference"].as_str().unwrap(), c["prediction"].as_str().unwrap());
        for (stem, key) in [(false, "plain"), (true, "stem")] {
            let want = &o[key];
            let tok = RougeTokenizer::new(stem);
            let want_ref: Vec<String> = serde_json::from_value(want["ref_tokens"].clone()).unwrap();
            let want_pred: Vec<String> = serde_json::from_value(want["pred_tokens"].clone()).unwrap();
            assert_eq!(tok.tokenize(reference_text), want_ref, "tokens of {reference_text:?} (stem={stem})");
            assert_eq!(tok.tokenize(prediction), want_pred, "tokens of {prediction:?} (stem={stem})");
            let got = rouge_l(reference_text, prediction, stem);
            for (g, k) in [(got.precision, "precision"), (got.recall, "recall"), (got.f1, "f1")] {
                dev.check(g, pf(&want[k]).unwrap(), format_args!("{k} of {reference_text:?} vs {prediction:?} (stem={stem})"));
            }
        }
    }
    println!("ROUGE-L: {n} cases x 2 stemmer settings, max relative deviation of P/R/F1 from rouge_score = {:e}", dev.max);
}

#[test]
fn porter_stemmer_matches_nltk_on_tofu_and_muse_vocabulary() {
    let r = reference();
    let stemmer = PorterStemmer::new();
    let words = r.cases["stem"].as_array().unwrap();
    let mismatches: Vec<String> = words
        .iter()
        .zip(r.out["stem"].as_array().unwrap())
        .filter_map(|(w, s)| {
            let (w, s) = (w.as_str().unwrap(), s.as_str().unwrap());
            let got = stemmer.stem(w);
            (got != s).then(|| format!("{w}: ours {got}, nltk {s}"))
        })
        .collect();
    println!("Porter stemmer: {} words, {} differ from nltk", words.len(), mismatches.len());
    assert!(mismatches.is_empty(), "{} mismatches, first: {:?}", mismatches.len(), &mismatches[..mismatches.len().min(20)]);
}

#[test]
fn roc_auc_matches_sklearn_including_ties() {
    let r = reference();
    let mut dev = MaxDev::new(1e-12);
    let mut n_single = 0;
    for (c, o) in r.section("auc") {
        let labels: Vec<bool> = c["labels"].as_array().unwrap().iter().map(|x| x.as_u64() == Some(1)).collect();
        let scores = f64s(&c["scores"]);
        let want = pf(&o["auc"]).unwrap();
        if labels.iter().all(|&l| l == labels[0]) {
            // sklearn 1.9 warns and returns NaN (older versions raised); we return an error.
            let err = roc_auc(&labels, &scores).unwrap_err().to_string();
            assert!(err.contains("only one class"), "{err}");
            assert!(want.is_nan(), "sklearn on one class gave {want}");
            n_single += 1;
            continue;
        }
        dev.check(roc_auc(&labels, &scores).unwrap(), want, format_args!("auc of {c}"));
        let curve = roc_curve(&labels, &scores).unwrap();
        let floats = |v: &Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| pf(x).unwrap()).collect() };
        assert_eq!(curve.fpr, floats(&o["fpr"]), "fpr for {c}");
        assert_eq!(curve.tpr, floats(&o["tpr"]), "tpr for {c}");
    }
    assert_eq!(n_single, 2);
    println!("ROC AUC: max relative deviation from sklearn = {:e} (and {n_single} one-class cases rejected)", dev.max);
}

#[test]
fn muse_auc_and_privleak_match_muse_convention() {
    let r = reference();
    let mut dev = MaxDev::new(1e-12);
    for (c, o) in r.section("muse_auc") {
        let got = muse_auc(&f64s(&c["forget"]), &f64s(&c["holdout"])).unwrap();
        dev.check(got, pf(&o["auc"]).unwrap(), "MUSE AUC");
        for (k, base) in [("privleak_news", AUC_RETRAIN_NEWS), ("privleak_books", AUC_RETRAIN_BOOKS)] {
            let w = pf(&o[k]).unwrap();
            assert!((privleak(got, base) - w).abs() <= 1e-12, "{k}: {} vs {w}", privleak(got, base));
        }
    }
    // A memorized forget set (forget texts far more likely = lower Min-K) gives AUC 0.
    assert_eq!(muse_auc(&[0.1, 0.2], &[1.0, 2.0]).unwrap(), 0.0);
    println!("MUSE AUC: max relative deviation from roc_curve(y, -s)+auc = {:e}", dev.max);
}

#[test]
fn ks_2samp_matches_scipy_exact_and_asymptotic() {
    let r = reference();
    let (mut exact, mut asymp, mut stat) = (MaxDev::new(1e-10), MaxDev::new(1e-10), MaxDev::new(1e-15));
    let (mut n_exact, mut n_asymp) = (0, 0);
    for (c, o) in r.section("ks") {
        let (a, b) = (f64s(&c["a"]), f64s(&c["b"]));
        let got = ks_2samp(&a, &b).unwrap();
        let (want_d, want_p) = (pf(&o["statistic"]).unwrap(), pf(&o["pvalue"]).unwrap());
        let scipy_fell_back =
            o["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap_or("").contains("Exact calculation unsuccessful"));
        let expect_exact = a.len().max(b.len()) <= 10_000 && !scipy_fell_back;
        let what = format!("n = {}, {}, D = {want_d}", a.len(), b.len());
        assert_eq!(got.method == KsMethod::Exact, expect_exact, "method for {what}: {got:?}, scipy warnings {}", o["warnings"]);
        stat.check(got.statistic, want_d, format_args!("D for {what}"));
        if got.method == KsMethod::Exact {
            n_exact += 1;
            exact.check(got.pvalue, want_p, format_args!("exact p for {what}"));
        } else {
            n_asymp += 1;
            asymp.check(got.pvalue, want_p, format_args!("asymptotic p for {what}"));
        }
    }
    println!(
        "KS 2-sample: {n_exact} exact cases max rel dev {:e}; {n_asymp} asymptotic cases max rel dev {:e}; D max rel dev {:e}",
        exact.max, asymp.max, stat.max
    );
}

#[test]
fn kstwo_and_smirnov_tails_match_scipy_on_every_branch() {
    let r = reference();
    let mut kstwo = MaxDev::new(1e-10);
    for (c, o) in r.section("kstwo") {
        let (d, n) = (c["d"].as_f64().unwrap(), c["n"].as_u64().unwrap());
        kstwo.check(unlearn::eval::metrics::ks::kstwo_sf(d, n), pf(o).unwrap(), format_args!("kstwo.sf({d}, {n})"));
    }
    let mut smirnov = MaxDev::new(1e-12);
    for (c, o) in r.section("smirnov") {
        let (d, n) = (c["d"].as_f64().unwrap(), c["n"].as_i64().unwrap());
        smirnov.check(unlearn::eval::metrics::ks::smirnov_sf(n, d), pf(o).unwrap(), format_args!("smirnov({n}, {d})"));
    }
    println!("kstwo.sf: max rel dev {:e}; smirnov: max rel dev {:e}", kstwo.max, smirnov.max);
}

#[test]
fn hmean_matches_scipy_including_zero_and_negative() {
    let r = reference();
    let mut dev = MaxDev::new(1e-15);
    for (c, o) in r.section("hmean") {
        dev.check(hmean(&f64s(c)), pf(o).unwrap(), format_args!("hmean({c})"));
    }
    println!("hmean: max rel dev {:e}", dev.max);
}

#[test]
fn min_k_matches_muse_and_open_unlearning_numpy_formulas() {
    let r = reference();
    let mut dev = MaxDev::new(1e-12);
    for (c, o) in r.section("mink") {
        let (lp, k) = (f64s(&c["logprobs"]), c["k"].as_f64().unwrap());
        for (rounding, key) in [(MinKRounding::Floor, "floor"), (MinKRounding::AtLeastOne, "at_least_one")] {
            let got = min_k_score(&lp, k, rounding);
            match (got, pf(&o[key])) {
                (Some(g), Some(w)) => dev.check(g, w, format_args!("min-k {key} k={k} n={}", lp.len())),
                (None, None) => {}
                (g, w) => panic!("min-k {key} k={k} n={}: ours {g:?}, numpy {w:?}", lp.len()),
            }
        }
    }
    println!("Min-K%: max rel dev from numpy {:e}", dev.max);
}

#[test]
fn tofu_aggregates_match_legacy_formulas() {
    let r = reference();
    let mut dev = MaxDev::new(1e-12);
    for (c, o) in r.section("tofu") {
        let mut stats = Vec::new();
        for model in ["unlearn", "retain"] {
            let para = f64s(&c[model]["para"]);
            let pert: Vec<Vec<f64>> = c[model]["pert"].as_array().unwrap().iter().map(f64s).collect();
            let s: Vec<f64> = para.iter().zip(&pert).map(|(&p, q)| tofu::truth_stat(p, q)).collect();
            let want = &o[model];
            for (i, w) in want["stat"].as_array().unwrap().iter().enumerate() {
                dev.check(s[i], pf(w).unwrap(), format_args!("{model} stat[{i}]"));
                dev.check(tofu::truth_ratio(para[i], &pert[i]), 1.0 / pf(w).unwrap(), format_args!("{model} R[{i}]"));
            }
            dev.check(tofu::forget_truth_ratio(&s), pf(&want["forget_tr"]).unwrap(), format_args!("{model} forget TR"));
            dev.check(tofu::utility_truth_ratio(&s), pf(&want["utility_tr"]).unwrap(), format_args!("{model} utility TR"));
            dev.check(tofu::mean_answer_prob(&para), pf(&want["prob"]).unwrap(), format_args!("{model} prob"));
            let questions: Vec<(f64, Vec<f64>)> = para.iter().copied().zip(pert.iter().cloned()).collect();
            dev.check(
                tofu::mean_normalized_true_prob(&questions),
                pf(&want["norm_prob"]).unwrap(),
                format_args!("{model} normalized prob"),
            );
            stats.push(s);
        }
        dev.check(tofu::forget_quality(&stats[0], &stats[1]).unwrap(), pf(&o["forget_quality"]).unwrap(), "forget quality");
        let u = f64s(&c["utility9"]);
        let t = |i: usize| tofu::UtilityTriple { rouge: u[i], prob: u[i + 1], truth_ratio: u[i + 2] };
        dev.check(tofu::model_utility(t(0), t(3), t(6)), pf(&o["model_utility"]).unwrap(), "model utility");
    }
    println!("TOFU aggregates: max rel dev from legacy formulas {:e}", dev.max);
}
