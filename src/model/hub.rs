//! Model ids as users have them (`meta-llama/Llama-2-7b-chat-hf`), resolved from the local
//! Hugging Face cache without any network access, wherever a model directory is accepted.
//!
//! The cache is where `huggingface_hub` puts it: `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`,
//! else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
//! A model `org/name` lives in `models--org--name/`: `refs/main` holds the commit of the
//! snapshot in `snapshots/<commit>/`. `org/name@rev` picks another ref (`refs/<rev>`) or a commit.
//! An existing directory always wins over an id, so local paths behave as before.

use std::path::{Path, PathBuf};

/// The directory for a model argument: the path itself when it is a directory (or not an id),
/// else the cached snapshot of the id. The error names every place looked at.
pub fn resolve_model(spec: &Path) -> Result<PathBuf, String> {
    resolve_with(spec, &|k| std::env::var(k).ok())
}

/// clap value parser for `--model`-like options.
pub fn model_arg(s: &str) -> Result<PathBuf, String> {
    resolve_model(Path::new(s))
}

/// A short name for a model directory: `org/name` for a hub snapshot, else the directory's name.
pub fn display_name(dir: &Path) -> String {
    let parts: Vec<String> = dir.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let n = parts.len();
    if n >= 3 && parts[n - 2] == "snapshots" {
        if let Some((org, name)) = parts[n - 3].strip_prefix("models--").and_then(|r| r.split_once("--")) {
            return format!("{org}/{name}");
        }
    }
    dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

/// The hub cache directory and the setting it came from, as `huggingface_hub` decides it.
pub fn hub_cache(env: &dyn Fn(&str) -> Option<String>) -> (PathBuf, String) {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    for key in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"] {
        if let Some(v) = set(key) {
            return (PathBuf::from(v), format!("${key}"));
        }
    }
    if let Some(v) = set("HF_HOME") {
        return (PathBuf::from(v).join("hub"), "$HF_HOME/hub".into());
    }
    if let Some(v) = set("XDG_CACHE_HOME") {
        return (PathBuf::from(v).join("huggingface/hub"), "$XDG_CACHE_HOME/huggingface/hub".into());
    }
    let home = set("HOME").unwrap_or_default();
    (PathBuf::from(home).join(".cache/huggingface/hub"), "the default ~/.cache/huggingface/hub (HF_HUB_CACHE and HF_HOME are unset)".into())
}

/// `(org, name, revision)` when `s` has the shape of a hub model id.
fn parse_id(s: &str) -> Option<(&str, &str, Option<&str>)> {
    let (id, rev) = match s.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (s, None),
    };
    let (org, name) = id.split_once('/')?;
    let ok = |p: &str| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    (ok(org) && ok(name) && rev.is_none_or(ok)).then_some((org, name, rev))
}

fn resolve_with(spec: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let Some((org, name, rev)) = spec.to_str().and_then(parse_id) else {
        return Ok(spec.to_path_buf());
    };
    let (cache, source) = hub_cache(env);
    let repo = cache.join(format!("models--{org}--{name}"));
    let id = format!("{org}/{name}");
    if !repo.is_dir() {
        return Err(format!(
            "`{}` is not a directory, and the model {id} is not in the local Hugging Face cache: {} does not exist (cache: {}, from {source}); \
             download it there first (e.g. `hf download {id}` on a machine with network access, then copy the cache) or give the model's directory",
            spec.display(),
            repo.display(),
            cache.display()
        ));
    }
    let snapshots = repo.join("snapshots");
    let wanted = rev.unwrap_or("main");
    let ref_file = repo.join("refs").join(wanted);
    let commit = if let Ok(text) = std::fs::read_to_string(&ref_file) {
        text.trim().to_string()
    } else if snapshots.join(wanted).is_dir() {
        wanted.to_string()
    } else {
        let present: Vec<String> = std::fs::read_dir(&snapshots)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        match (rev, present.as_slice()) {
            // A cache filled by a download of one specific commit has no refs/main.
            (None, [only]) => only.clone(),
            _ => {
                return Err(format!(
                    "the local Hugging Face cache has {id} at {} but neither {} nor a snapshot named `{wanted}` (snapshots present: {present:?})",
                    repo.display(),
                    ref_file.display()
                ))
            }
        }
    };
    let dir = snapshots.join(&commit);
    if !dir.join("config.json").is_file() {
        return Err(format!(
            "the cached snapshot of {id} at {} has no config.json (an incomplete download, or not a model repository)",
            dir.display()
        ));
    }
    tracing::info!("model {} resolved from the Hugging Face cache: {}", spec.display(), dir.display());
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn cache_location_follows_huggingface_hub_precedence() {
        let all = [("HF_HUB_CACHE", "/a"), ("HUGGINGFACE_HUB_CACHE", "/b"), ("HF_HOME", "/c"), ("XDG_CACHE_HOME", "/d"), ("HOME", "/e")];
        assert_eq!(hub_cache(&env_of(&all)).0, PathBuf::from("/a"));
        assert_eq!(hub_cache(&env_of(&all[1..])).0, PathBuf::from("/b"));
        assert_eq!(hub_cache(&env_of(&all[2..])).0, PathBuf::from("/c/hub"));
        assert_eq!(hub_cache(&env_of(&all[3..])).0, PathBuf::from("/d/huggingface/hub"));
        assert_eq!(hub_cache(&env_of(&all[4..])).0, PathBuf::from("/e/.cache/huggingface/hub"));
        assert_eq!(hub_cache(&env_of(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/c")])).0, PathBuf::from("/c/hub"));
    }

    #[test]
    fn ids_are_told_from_paths() {
        assert_eq!(parse_id("meta-llama/Llama-2-7b-chat-hf"), Some(("meta-llama", "Llama-2-7b-chat-hf", None)));
        assert_eq!(parse_id("org/m@v1.0"), Some(("org", "m", Some("v1.0"))));
        for not_id in ["m", "./m", "../a/b", "/abs/path", "a/b/c", "a/", "org/m@", "a b/c"] {
            assert_eq!(parse_id(not_id), None, "{not_id}");
        }
    }

    #[test]
    fn snapshot_is_found_through_refs_and_missing_models_name_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("hub");
        let snap = cache.join("models--org--tiny/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::create_dir_all(cache.join("models--org--tiny/refs")).unwrap();
        std::fs::write(cache.join("models--org--tiny/refs/main"), "abc123\n").unwrap();
        let vars = [("HF_HUB_CACHE", cache.to_str().unwrap())];
        let env = env_of(&vars);
        let got = resolve_with(Path::new("org/tiny"), &env).unwrap();
        assert_eq!(got, snap);
        assert_eq!(display_name(&got), "org/tiny");
        assert_eq!(resolve_with(Path::new("org/tiny@abc123"), &env).unwrap(), snap);
        let err = resolve_with(Path::new("org/other"), &env).unwrap_err();
        assert!(err.contains(&cache.join("models--org--other").display().to_string()) && err.contains("$HF_HUB_CACHE"), "{err}");
        let err = resolve_with(Path::new("org/tiny@v2"), &env).unwrap_err();
        assert!(err.contains("refs/v2") && err.contains("abc123"), "{err}");
        // An existing directory is taken as it is, even when shaped like an id.
        let local = tmp.path().join("org/tiny");
        std::fs::create_dir_all(&local).unwrap();
        assert_eq!(resolve_with(&local, &env).unwrap(), local);
    }
}
