//! Parquet dataset files (the benchmarks' Hugging Face layout), written by pyarrow from the shared
//! JSON with each codec the hub uses, read back into exactly the records and evaluation rows the
//! JSON gives; a damaged file is an error naming it.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use unlearn::data::formats::read_json_values;
use unlearn::data::read_records;

/// (file under shared/data, whether its records are training records (QA/text) as well as rows).
const FILES: &[(&str, bool)] = &[
    ("tofu/forget01.json", true),
    ("tofu/full.json", true),
    ("tofu/forget01_perturbed.json", true),
    ("tofu/world_facts_perturbed.json", true),
    ("muse/news/knowmem/forget_qa.json", true),
    ("muse/news/verbmem/forget.json", true),
    ("muse/news/privleak/forget.json", true),
    ("muse/mmlu_subsample/mmlu_all_val.json", false),
];

/// Write each (JSON file, Parquet file, codec) job with pyarrow, in one Python process.
fn write_parquet(dir: &Path, jobs: &[(PathBuf, PathBuf, &str)]) {
    let list: Vec<serde_json::Value> = jobs.iter().map(|(j, p, c)| serde_json::json!({"json": j, "out": p, "compression": c})).collect();
    let file = dir.join("jobs.json");
    std::fs::write(&file, serde_json::to_string(&list).unwrap()).unwrap();
    run_py("parquet_ref.py", &["write", "--jobs", file.to_str().unwrap()]);
}

#[test]
fn parquet_rows_equal_the_json_records_for_every_codec() {
    let tmp = tempfile::tempdir().unwrap();
    let codecs = ["snappy", "zstd", "none"];
    let pq = |rel: &str, codec: &str| tmp.path().join(format!("{}.{codec}.parquet", rel.replace('/', "_")));
    let jobs: Vec<(PathBuf, PathBuf, &str)> =
        FILES.iter().flat_map(|(rel, _)| codecs.iter().map(move |c| (shared_data().join(rel), pq(rel, c), *c))).collect();
    write_parquet(tmp.path(), &jobs);
    for &(rel, is_training) in FILES {
        let json = shared_data().join(rel);
        let values = read_json_values(&json).unwrap();
        for codec in codecs {
            let pq = pq(rel, codec);
            let rows = read_json_values(&pq).unwrap();
            assert_eq!(rows.len(), values.len(), "{rel} ({codec}): row count");
            for (i, (row, v)) in rows.iter().zip(&values).enumerate() {
                // String records (MUSE text) are a `text` column on the hub.
                let want = if v.is_string() { serde_json::json!({ "text": v }) } else { v.clone() };
                assert_eq!(row, &want, "{rel} ({codec}): row {i}");
            }
            if is_training {
                assert_eq!(read_records(&pq).unwrap(), read_records(&json).unwrap(), "{rel} ({codec}): records");
            }
        }
        println!("{rel}: {} rows identical to the JSON with snappy, zstd and no compression", values.len());
    }
}

#[test]
fn damaged_parquet_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let pq = tmp.path().join("forget01.parquet");
    write_parquet(tmp.path(), &[(shared_data().join("tofu/forget01.json"), pq.clone(), "zstd")]);
    let bytes = std::fs::read(&pq).unwrap();
    for (what, cut) in [("truncated", &bytes[..bytes.len() / 2]), ("header only", &bytes[..4])] {
        let bad = tmp.path().join(format!("{}.parquet", what.replace(' ', "_")));
        std::fs::write(&bad, cut).unwrap();
        let err = read_records(&bad).unwrap_err().to_string();
        assert!(err.contains(bad.to_str().unwrap()) && err.contains("Parquet"), "{what}: {err}");
        println!("{what}: {err}");
    }
}
