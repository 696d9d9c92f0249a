//! ROUGE-L as Google's `rouge_score` 0.1.2 computes it for MUSE (VerbMem/KnowMem, F1, no stemmer)
//! and TOFU (recall, stemmer on): `RougeScorer(["rougeL"], use_stemmer=..).score(target, prediction)`.
//!
//! Tokenizer (rouge_score `tokenize.tokenize`): Python `str.lower()`, every run of characters
//! outside `[a-z0-9]` becomes a space, split on whitespace, Porter-stem tokens longer than 3
//! characters when the stemmer is on, drop empty tokens. Non-ASCII letters therefore vanish, except
//! the two code points whose Unicode lower case is ASCII: U+212A KELVIN SIGN -> `k` and U+0130
//! (I with dot) -> `i` + U+0307 (which then becomes a separator).

use super::porter::PorterStemmer;

/// rouge_score's `Score` for one rouge type.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RougeL {
    /// LCS / number of prediction tokens.
    pub precision: f64,
    /// LCS / number of reference (target) tokens. TOFU reports this.
    pub recall: f64,
    /// rouge_score's `fmeasure`. MUSE reports this.
    pub f1: f64,
}

/// rouge_score's `DefaultTokenizer`. Reuse one for many texts.
#[derive(Debug, Clone, Copy, Default)]
pub struct RougeTokenizer {
    stemmer: Option<PorterStemmer>,
}

impl RougeTokenizer {
    pub fn new(use_stemmer: bool) -> Self {
        RougeTokenizer { stemmer: use_stemmer.then(PorterStemmer::new) }
    }

    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        let mut current = String::new();
        // Lower-casing char by char equals Python's str.lower() on everything that can survive the
        // [a-z0-9] filter (the final-sigma context rule only ever yields a non-ASCII sigma).
        for c in text.chars().flat_map(char::to_lowercase) {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                current.push(c);
            } else if !current.is_empty() {
                self.finish(std::mem::take(&mut current), &mut tokens);
            }
        }
        if !current.is_empty() {
            self.finish(current, &mut tokens);
        }
        tokens
    }

    fn finish(&self, token: String, tokens: &mut Vec<String>) {
        let token = match &self.stemmer {
            // Only tokens longer than 3 characters are stemmed (rouge_score's rule, not Porter's).
            Some(s) if token.len() > 3 => s.stem(&token),
            _ => token,
        };
        // rouge_score drops tokens that end up empty.
        if !token.is_empty() {
            tokens.push(token);
        }
    }
}

/// `RougeScorer(["rougeL"], use_stemmer)`: tokenizes both texts and scores their LCS.
#[derive(Debug, Clone, Copy, Default)]
pub struct RougeScorer {
    tokenizer: RougeTokenizer,
}

impl RougeScorer {
    pub fn new(use_stemmer: bool) -> Self {
        RougeScorer { tokenizer: RougeTokenizer::new(use_stemmer) }
    }

    /// `scorer.score(target=reference, prediction=prediction)["rougeL"]`.
    pub fn score(&self, reference: &str, prediction: &str) -> RougeL {
        rouge_l_tokens(&self.tokenizer.tokenize(reference), &self.tokenizer.tokenize(prediction))
    }
}

/// ROUGE-L of `prediction` against `reference`, exactly as rouge_score.
pub fn rouge_l(reference: &str, prediction: &str, stem: bool) -> RougeL {
    RougeScorer::new(stem).score(reference, prediction)
}

/// rouge_score's `_score_lcs` on already tokenized texts; all zeros when either side is empty.
pub fn rouge_l_tokens<T: Eq>(reference: &[T], prediction: &[T]) -> RougeL {
    if reference.is_empty() || prediction.is_empty() {
        return RougeL { precision: 0.0, recall: 0.0, f1: 0.0 };
    }
    let lcs = lcs_len(reference, prediction) as f64;
    let precision = lcs / prediction.len() as f64;
    let recall = lcs / reference.len() as f64;
    // Same operation order as rouge_score's scoring.fmeasure, so results are bit-identical.
    let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    RougeL { precision, recall, f1 }
}

/// Length of the longest common subsequence, O(|a|·|b|) time and O(|b|) memory.
pub fn lcs_len<T: Eq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_only_ascii_alphanumerics_after_lowercasing() {
        let t = RougeTokenizer::new(false);
        assert_eq!(t.tokenize("Héllo, WORLD! 42x \u{212A}elvin \u{130}stanbul"), ["h", "llo", "world", "42x", "kelvin", "i", "stanbul"]);
        assert!(t.tokenize("!!! ...").is_empty());
    }

    #[test]
    fn only_kelvin_and_dotted_capital_i_lowercase_into_ascii() {
        // Python's str.lower() has exactly these two (checked with unicodedata 14 / Python 3.11).
        let odd: Vec<char> =
            (0x80..=0x10FFFFu32).filter_map(char::from_u32).filter(|c| c.to_lowercase().any(|l| l.is_ascii_alphanumeric())).collect();
        assert_eq!(odd, ['\u{130}', '\u{212A}']);
    }

    #[test]
    fn lcs_of_shifted_sequences() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3, 4]), 3);
        let r = rouge_l("the cat sat", "the cat", false);
        assert_eq!((r.precision, r.recall), (1.0, 2.0 / 3.0));
    }
}
