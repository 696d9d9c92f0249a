//! Text handling around generation, as the benchmark code does it: decoding with transformers'
//! `clean_up_tokenization_spaces`, cutting outputs at stop strings, and fitting long prompts.

use crate::data::Tokenizer;
use crate::Result;

/// MUSE's KnowMem (and mt-unlearn's MMLU) stop strings.
pub const KNOWMEM_STOPS: &[&str] = &["\n\n", "\nQuestion", "Question:"];

/// MUSE's `get_prefix_before_words_occur`: for each stop string in turn, keep the part before its
/// first occurrence.
pub fn cut_at_stops(text: &str, stops: &[&str]) -> String {
    let mut s = text;
    for stop in stops {
        if let Some(pos) = s.find(stop) {
            s = &s[..pos];
        }
    }
    s.to_string()
}

/// transformers' `clean_up_tokenization`: remove the space a word-piece style decode leaves before
/// punctuation and English contractions. Applied when the reference code decodes with
/// `clean_up_tokenization_spaces=True` (MUSE's VerbMem and KnowMem).
pub fn clean_up_tokenization(text: &str) -> String {
    const PAIRS: &[(&str, &str)] = &[
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    let mut s = text.to_string();
    for (from, to) in PAIRS {
        s = s.replace(from, to);
    }
    s
}

/// Decode generated ids without special tokens, optionally with the clean-up above.
pub fn decode(tok: &Tokenizer, ids: &[i64], clean_up: bool) -> Result<String> {
    let text = tok.decode(ids, true)?;
    Ok(if clean_up { clean_up_tokenization(&text) } else { text })
}

/// How many special tokens the tokenizer puts in front of a text (Llama-2's BOS: 1; byte-level BPE
/// tokenizers without BOS: 0).
pub fn leading_specials(tok: &Tokenizer) -> Result<usize> {
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    Ok(with.len().saturating_sub(without.len()))
}

/// Fit a prompt into `max` tokens by dropping its oldest tokens but keeping the `lead` special
/// tokens in front; the continuation still follows the prompt's end. Returns whether it was cut.
pub fn keep_last_tokens(ids: &mut Vec<i64>, max: usize, lead: usize) -> bool {
    if ids.len() <= max {
        return false;
    }
    let lead = lead.min(max).min(ids.len());
    let tail_start = ids.len() - (max - lead);
    let mut out = ids[..lead].to_vec();
    out.extend_from_slice(&ids[tail_start..]);
    *ids = out;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_cut_sequentially_and_prompts_keep_their_bos() {
        assert_eq!(cut_at_stops(" Paris.\n\nQuestion: x", KNOWMEM_STOPS), " Paris.");
        assert_eq!(cut_at_stops(" 42\nQuestion: y", KNOWMEM_STOPS), " 42");
        assert_eq!(cut_at_stops("no stop", KNOWMEM_STOPS), "no stop");
        assert_eq!(clean_up_tokenization("I do n't know , he 's here ."), "I don't know, he's here.");
        let mut ids = vec![1, 10, 11, 12, 13];
        assert!(keep_last_tokens(&mut ids, 3, 1));
        assert_eq!(ids, vec![1, 12, 13]);
        let mut ids = vec![10, 11, 12];
        assert!(!keep_last_tokens(&mut ids, 3, 0));
    }
}
