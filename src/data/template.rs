//! Prompt templates: how a question, and its answer, become tokens. Training, `score` and
//! evaluation all go through [`Template`], so a model is trained and evaluated on one format.
//!
//! - `phi-qa` (the default, TOFU's Phi-1.5 format): prompt `"Question: {q}\nAnswer:"` tokenized
//!   with the tokenizer's specials (BOS for Llama), answer `" {a}"` without, then the EOS id.
//! - `llama2-chat`, `llama3-chat`, `chatml`: the conversation [user: q, assistant: a] as Meta's
//!   Llama-2-chat template, Meta's Llama-3-Instruct template and plain ChatML render it (no system
//!   message); the prompt is the rendering of [user: q] with the generation prompt.
//! - `model`: the model's own chat template (`chat_template.jinja`, else `chat_template` of
//!   tokenizer_config.json), rendered as transformers' `apply_chat_template` renders it.
//!
//! Chat renderings are tokenized as `apply_chat_template(..., tokenize=True)` tokenizes them: the
//! whole text, without adding specials (the template writes BOS itself). The targets are what
//! follows the prompt: the answer and the template's end-of-turn token (`</s>`, `<|eot_id|>`,
//! `<|im_end|>`, found for a model template as the first special token the template writes after
//! the answer). Whatever the template writes after the end-of-turn token (ChatML's `"\n"`) is not
//! part of the example: generation stops at that token, so a loss on what follows would teach
//! nothing the model ever produces (open-unlearning keeps it and appends EOS again; we do not). A
//! template with no special token after the answer gets the EOS id appended, as phi-qa does.
//! When an answer's first characters would merge with the prompt's last token (whitespace after
//! ChatML's `"\n"`), the prompt keeps its own tokens and the turn is tokenized on its own, so the
//! context is always exactly the generation prompt.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::{context, Environment, Value};

use super::jinja;
use super::tokenizer::Tokenizer;
use crate::config::{choice, Choice};
use crate::error::{Error, Result};

/// The plain QA prompt format (the one TOFU used for Phi-1.5).
pub fn qa_prompt(question: &str) -> String {
    format!("Question: {question}\nAnswer:")
}

/// The answer continuation that follows [`qa_prompt`].
pub fn qa_answer(answer: &str) -> String {
    format!(" {answer}")
}

/// Which prompt format: the `[data] template` setting and `--template` of eval and score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    PhiQa,
    Llama2Chat,
    Llama3Chat,
    Chatml,
    Model,
}
choice!(TemplateKind {
    "phi-qa" => TemplateKind::PhiQa,
    "llama2-chat" => TemplateKind::Llama2Chat,
    "llama3-chat" => TemplateKind::Llama3Chat,
    "chatml" => TemplateKind::Chatml,
    "model" => TemplateKind::Model,
});

/// The template for evaluating or scoring `model_dir`, with where the choice came from: `given`
/// (`--template`), else `data.template` of the run that produced the model (`unlearn run` writes
/// `OUT/config.toml` next to `OUT/final`), else phi-qa.
pub fn template_for(given: Option<TemplateKind>, model_dir: &Path) -> Result<(TemplateKind, String)> {
    if let Some(kind) = given {
        return Ok((kind, "--template".into()));
    }
    let run_config = model_dir.parent().map(|p| p.join("config.toml")).filter(|p| p.is_file());
    let Some(path) = run_config else {
        return Ok((TemplateKind::PhiQa, "default".into()));
    };
    let from = format!("data.template of {}", path.display());
    match crate::config::saved_template(&path)? {
        None => Ok((TemplateKind::PhiQa, format!("{from} (unset: phi-qa)"))),
        Some(kind) => Ok((kind, from)),
    }
}

/// A template ready to format QA records for one tokenizer.
#[derive(Debug, Clone)]
pub struct Template {
    kind: TemplateKind,
    chat: Option<Chat>,
}

#[derive(Debug, Clone)]
struct Chat {
    render: Render,
    /// The token that closes the assistant turn, with its id; `None` when the template writes no
    /// special token after the answer (EOS is then appended).
    end_of_turn: Option<(String, i64)>,
}

#[derive(Debug, Clone)]
enum Render {
    /// One of the built-in formats.
    Named(TemplateKind),
    /// A Jinja chat template, with the special-token variables transformers passes to it.
    Jinja { env: Arc<Environment<'static>>, specials: BTreeMap<String, String>, source: PathBuf },
}

const USER: &str = "user";
const ASSISTANT: &str = "assistant";

impl Template {
    /// The default format; needs nothing from the model directory.
    pub fn phi_qa() -> Self {
        Template { kind: TemplateKind::PhiQa, chat: None }
    }

    /// Prepare `kind` for the model in `model_dir` whose tokenizer is `tok`: a named chat format
    /// needs its special tokens in the tokenizer; `model` needs a chat template in the directory.
    pub fn load(kind: TemplateKind, model_dir: &Path, tok: &Tokenizer) -> Result<Self> {
        let render = match kind {
            TemplateKind::PhiQa => return Ok(Self::phi_qa()),
            TemplateKind::Model => model_template(model_dir)?,
            named => {
                let added = tok.added_tokens();
                if let Some(missing) = named_markers(named).iter().find(|m| !added.iter().any(|a| a == *m)) {
                    return Err(Error::format(
                        tok.path(),
                        format!(
                            "template `{}` needs the special token `{missing}`, which this tokenizer does not have; use `model` (the model's own chat template) or another template",
                            named.name()
                        ),
                    ));
                }
                Render::Named(named)
            }
        };
        let mut chat = Chat { render, end_of_turn: None };
        chat.end_of_turn = chat.find_end_of_turn(tok)?;
        Ok(Template { kind, chat: Some(chat) })
    }

    pub fn kind(&self) -> TemplateKind {
        self.kind
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Where a `model` template came from; the name otherwise (for reports).
    pub fn describe(&self) -> String {
        match &self.chat {
            Some(Chat { render: Render::Jinja { source, .. }, .. }) => format!("model ({})", source.display()),
            _ => self.name().to_string(),
        }
    }

    /// Chat formats render conversations; phi-qa is a plain completion format.
    pub fn is_chat(&self) -> bool {
        self.chat.is_some()
    }

    /// Token ids after which generation stops besides the model's EOS ids (the end-of-turn token).
    pub fn stop_ids(&self) -> Vec<i64> {
        self.chat.iter().filter_map(|c| c.end_of_turn.as_ref().map(|(_, id)| *id)).collect()
    }

    /// The text a model answers `question` from, after the few-shot `shots` (earlier user and
    /// assistant turns; chat formats only: MUSE KnowMem keeps its own few-shot text for phi-qa).
    pub fn prompt_text(&self, shots: &[(String, String)], question: &str) -> Result<String> {
        match &self.chat {
            None if shots.is_empty() => Ok(qa_prompt(question)),
            None => Err(crate::other!("the phi-qa template has no few-shot form")),
            Some(chat) => {
                let mut msgs: Vec<(&str, &str)> = shots.iter().flat_map(|(q, a)| [(USER, q.as_str()), (ASSISTANT, a.as_str())]).collect();
                msgs.push((USER, question));
                chat.render(&msgs, true)
            }
        }
    }

    /// Token ids of a prompt text built by [`Template::prompt_text`].
    pub fn encode_prompt(&self, tok: &Tokenizer, text: &str) -> Result<Vec<i64>> {
        tok.encode(text, !self.is_chat())
    }

    /// Token ids of the generation prompt for `question`.
    pub fn prompt_ids(&self, tok: &Tokenizer, question: &str) -> Result<Vec<i64>> {
        self.encode_prompt(tok, &self.prompt_text(&[], question)?)
    }

    /// `(ids, n_context)` of a question and its answer: `ids[n_context..]` are the targets (the
    /// answer and the end of the assistant turn). Not truncated.
    pub fn qa_tokens(&self, tok: &Tokenizer, question: &str, answer: &str) -> Result<(Vec<i64>, usize)> {
        let Some(chat) = &self.chat else {
            let mut ids = tok.encode(&qa_prompt(question), true)?;
            let n_context = ids.len();
            ids.extend(tok.encode(&qa_answer(answer), false)?);
            ids.push(tok.eos_id()?);
            return Ok((ids, n_context));
        };
        let prompt = chat.render(&[(USER, question)], true)?;
        let full = chat.render(&[(USER, question), (ASSISTANT, answer)], false)?;
        let turn = chat.assistant_turn(&prompt, &full, answer)?;
        let context = tok.encode(&prompt, false)?;
        let mut ids = tok.encode(&format!("{prompt}{turn}"), false)?;
        if !ids.starts_with(&context) {
            // The answer's first characters merge with the prompt's last token (an answer starting
            // with whitespace after ChatML's "\n"): keep the generation prompt's tokens, which is
            // what the model answers from in evaluation, and tokenize the turn on its own.
            static NOTED: std::sync::Once = std::sync::Once::new();
            NOTED.call_once(|| {
                tracing::warn!(
                    "template `{}`: an answer ({answer:?}) merges with the prompt's last token; such answers are tokenized apart from the prompt",
                    self.name()
                )
            });
            ids = context.clone();
            ids.extend(tok.encode(turn, false)?);
        }
        if chat.end_of_turn.is_none() {
            ids.push(tok.eos_id()?);
        }
        Ok((ids, context.len()))
    }
}

impl Chat {
    /// The conversation `msgs` (role, content) as text.
    fn render(&self, msgs: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        match &self.render {
            Render::Named(kind) => Ok(render_named(*kind, msgs, add_generation_prompt)),
            Render::Jinja { env, specials, source } => {
                let messages: Vec<Value> = msgs.iter().map(|(role, content)| context! { role => *role, content => *content }).collect();
                let ctx = context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    tools => (),
                    documents => (),
                    ..Value::from(specials.clone())
                };
                env.get_template(jinja::TEMPLATE_NAME)
                    .and_then(|t| t.render(ctx))
                    .map_err(|e| Error::format(source, format!("chat template: {}", jinja::describe(&e))))
            }
        }
    }

    /// What the template writes after the generation prompt, through the end-of-turn token.
    fn assistant_turn<'a>(&self, prompt: &str, full: &'a str, answer: &str) -> Result<&'a str> {
        let rest = full.strip_prefix(prompt).ok_or_else(|| {
            crate::other!("the chat template's rendering of a question with its answer does not begin with its rendering of the question's prompt, so the answer cannot be told apart")
        })?;
        let Some((eot, _)) = &self.end_of_turn else {
            return Ok(rest);
        };
        let stripped = py_strip(answer);
        let from = rest.find(stripped).map_or(0, |i| i + stripped.len());
        let at = rest[from..]
            .find(eot.as_str())
            .ok_or_else(|| crate::other!("the chat template wrote no end-of-turn token `{eot}` after the answer {answer:?}"))?;
        Ok(&rest[..from + at + eot.len()])
    }

    /// The first added token the template writes after an answer, probed on one conversation.
    fn find_end_of_turn(&self, tok: &Tokenizer) -> Result<Option<(String, i64)>> {
        let (q, a) = ("Who wrote this probe question?", "This probe answer was written by unlearn.");
        let prompt = self.render(&[(USER, q)], true)?;
        let full = self.render(&[(USER, q), (ASSISTANT, a)], false)?;
        let Some(rest) = full.strip_prefix(&prompt) else {
            return Err(crate::other!(
                "the chat template's rendering of a conversation with an answer does not begin with its rendering of the prompt (prompt {prompt:?}, conversation {full:?}), so answer tokens cannot be told apart"
            ));
        };
        let after = rest.find(a).map_or(rest, |i| &rest[i + a.len()..]);
        let first = tok
            .added_tokens()
            .into_iter()
            .filter(|t| !t.is_empty())
            .filter_map(|t| after.find(&t).map(|i| (i, std::cmp::Reverse(t.len()), t)))
            .min();
        Ok(first.and_then(|(_, _, t)| tok.token_id(&t).map(|id| (t, id))))
    }
}

/// The special tokens a named format writes (each must be a whole token of the tokenizer).
fn named_markers(kind: TemplateKind) -> &'static [&'static str] {
    match kind {
        TemplateKind::Llama2Chat => &["<s>", "</s>"],
        TemplateKind::Llama3Chat => &["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        TemplateKind::Chatml => &["<|im_start|>", "<|im_end|>"],
        TemplateKind::PhiQa | TemplateKind::Model => &[],
    }
}

/// The built-in formats, written out as the corresponding Jinja templates render them.
fn render_named(kind: TemplateKind, msgs: &[(&str, &str)], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    match kind {
        // Meta's Llama-2-chat template: content stripped, no generation prompt of its own.
        TemplateKind::Llama2Chat => {
            for (role, content) in msgs {
                if *role == USER {
                    out.push_str(&format!("<s>[INST] {} [/INST]", py_strip(content)));
                } else {
                    out.push_str(&format!(" {} </s>", py_strip(content)));
                }
            }
        }
        // Meta's Llama-3-Instruct template: BOS once, content trimmed.
        TemplateKind::Llama3Chat => {
            out.push_str("<|begin_of_text|>");
            for (role, content) in msgs {
                out.push_str(&format!("<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>", py_strip(content)));
            }
            if add_generation_prompt {
                out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
            }
        }
        TemplateKind::Chatml => {
            for (role, content) in msgs {
                out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
            }
            if add_generation_prompt {
                out.push_str("<|im_start|>assistant\n");
            }
        }
        TemplateKind::PhiQa | TemplateKind::Model => unreachable!("not a named chat format"),
    }
    out
}

/// Python's `str.strip()` (and Jinja's `trim`): Unicode whitespace plus the ASCII separators
/// U+001C..U+001F, which Python counts as whitespace and Rust does not.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The model's chat template and the special-token strings transformers passes to it.
fn model_template(dir: &Path) -> Result<Render> {
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| Error::format(&config_path, format!("not JSON: {e}")))?,
        Err(_) => serde_json::Value::Null,
    };
    let jinja_path = dir.join("chat_template.jinja");
    // transformers 5 prefers chat_template.jinja over the copy in tokenizer_config.json.
    let (source, path) = if jinja_path.is_file() {
        (std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?, jinja_path)
    } else {
        match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => (s.clone(), config_path.clone()),
            // The older list form: [{"name": "default", "template": ...}, {"name": "tool_use", ...}].
            Some(serde_json::Value::Array(list)) => {
                let default = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(s) => (s.to_string(), config_path.clone()),
                    None => return Err(Error::format(&config_path, "`chat_template` is a list without a template named \"default\"")),
                }
            }
            _ => {
                return Err(Error::format(
                    dir,
                    "template `model` needs the model's chat template, but there is no chat_template.jinja and no `chat_template` in tokenizer_config.json; choose a named template (phi-qa, llama2-chat, llama3-chat, chatml)",
                ))
            }
        }
    };
    let env = jinja::environment(&source).map_err(|e| Error::format(&path, format!("chat template does not compile: {e}")))?;
    let mut specials = BTreeMap::new();
    for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
        let text = match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        if let Some(t) = text {
            specials.insert(key.to_string(), t);
        }
    }
    Ok(Render::Jinja { env: Arc::new(env), specials, source: path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_the_command_line_and_from_name() {
        assert_eq!(TemplateKind::names(), ["phi-qa", "llama2-chat", "llama3-chat", "chatml", "model"]);
        for &(name, kind) in TemplateKind::VALUES {
            assert_eq!(kind.name(), name);
            assert_eq!(TemplateKind::from_name(name), Some(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{name}\""));
            assert_eq!(crate::config::parse_choice::<TemplateKind>(name), Ok(kind));
        }
        assert_eq!(TemplateKind::from_name("llama3"), None);
        assert!(crate::config::parse_choice::<TemplateKind>("llama3").unwrap_err().contains("allowed: phi-qa, llama2-chat"));
    }

    #[test]
    fn named_formats_render_the_reference_texts() {
        let msgs = [(USER, " Who? "), (ASSISTANT, " Her.\n")];
        assert_eq!(render_named(TemplateKind::Llama2Chat, &msgs, false), "<s>[INST] Who? [/INST] Her. </s>");
        assert_eq!(render_named(TemplateKind::Llama2Chat, &msgs[..1], true), "<s>[INST] Who? [/INST]");
        assert_eq!(
            render_named(TemplateKind::Llama3Chat, &msgs[..1], true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWho?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            render_named(TemplateKind::Chatml, &msgs, false),
            "<|im_start|>user\n Who? <|im_end|>\n<|im_start|>assistant\n Her.\n<|im_end|>\n"
        );
        assert_eq!(py_strip("\u{1f} x \u{a0}"), "x");
    }
}
