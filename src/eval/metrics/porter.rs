//! Porter stemmer in the mode rouge_score gets from `nltk.stem.porter.PorterStemmer()`: the
//! default `NLTK_EXTENSIONS`, i.e. Porter (1980) plus Martin Porter's later fixes plus NLTK's own
//! (irregular-form table, `ies`/`ied` on 4-letter words, `y -> i` only after a consonant, the
//! 2-letter `*o` case, `alli`/`fulli`/`logi` in step 2). Written from the algorithm description
//! and NLTK's documented rules; `tests/metrics.rs` checks it word by word against nltk.
//!
//! Quirks kept on purpose because they change stems: a rule list stops at the first rule whose
//! suffix matches, even when its condition fails; step 2's `logi` tests the measure of the word
//! minus three letters (stem + "l"); step 5b tests the measure of the word minus one letter.

/// NLTK's irregular forms (`NLTK_EXTENSIONS` only): whole words mapped straight to a stem.
fn irregular(word: &str) -> Option<&'static str> {
    Some(match word {
        "sky" | "skies" => "sky",
        "dying" => "die",
        "lying" => "lie",
        "tying" => "tie",
        "news" => "news",
        "innings" | "inning" => "inning",
        "outings" | "outing" => "outing",
        "cannings" | "canning" => "canning",
        "howe" => "howe",
        "proceed" => "proceed",
        "exceed" => "exceed",
        "succeed" => "succeed",
        _ => return None,
    })
}

/// The Porter stemmer, NLTK_EXTENSIONS mode. Stateless; `stem` lower-cases like nltk does.
#[derive(Debug, Clone, Copy, Default)]
pub struct PorterStemmer;

impl PorterStemmer {
    pub fn new() -> Self {
        PorterStemmer
    }

    pub fn stem(&self, word: &str) -> String {
        let lower = word.to_lowercase();
        if let Some(s) = irregular(&lower) {
            return s.to_string();
        }
        // nltk tests the length of the word as given, before lower-casing.
        if word.chars().count() <= 2 {
            return lower;
        }
        let mut w: Vec<char> = lower.chars().collect();
        w = step1a(w);
        w = step1b(w);
        w = step1c(w);
        w = step2(w);
        w = step3(w);
        w = step4(w);
        w = step5a(w);
        w = step5b(w);
        w.into_iter().collect()
    }
}

fn is_vowel_letter(c: char) -> bool {
    matches!(c, 'a' | 'e' | 'i' | 'o' | 'u')
}

/// Porter's consonant: not a vowel letter, and `y` only when it starts the word or follows a vowel.
fn is_consonant(w: &[char], i: usize) -> bool {
    if is_vowel_letter(w[i]) {
        return false;
    }
    if w[i] == 'y' {
        return i == 0 || !is_consonant(w, i - 1);
    }
    true
}

fn consonant_flags(w: &[char]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel_letter(c) {
            false
        } else if c == 'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

/// m in `[C](VC){m}[V]`: the number of vowel-to-consonant transitions.
fn measure(stem: &[char]) -> usize {
    consonant_flags(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &[char]) -> bool {
    consonant_flags(stem).iter().any(|&c| !c)
}

fn ends_double_consonant(w: &[char]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// `*o`: ends consonant-vowel-consonant, the last not w/x/y; NLTK also accepts a 2-letter
/// vowel-consonant word.
fn ends_cvc(w: &[char]) -> bool {
    let n = w.len();
    (n >= 3 && is_consonant(w, n - 3) && !is_consonant(w, n - 2) && is_consonant(w, n - 1) && !matches!(w[n - 1], 'w' | 'x' | 'y'))
        || (n == 2 && !is_consonant(w, 0) && is_consonant(w, 1))
}

fn ends_with(w: &[char], suffix: &str) -> bool {
    let n = suffix.chars().count();
    w.len() >= n && w[w.len() - n..].iter().copied().eq(suffix.chars())
}

/// `w` without its last `n` characters, plus `tail`.
fn replaced(w: &[char], n: usize, tail: &str) -> Vec<char> {
    let mut out = w[..w.len() - n].to_vec();
    out.extend(tail.chars());
    out
}

#[derive(Clone, Copy)]
enum Cond {
    Always,
    /// measure(stem) > 0
    M0,
    /// measure(stem) > 1
    M1,
    /// measure(stem) > 1 and the stem ends in s or t (step 4's `ion`).
    M1st,
    /// NLTK's `logi`: measure(word minus 3 letters) > 0.
    Logi,
}

impl Cond {
    fn holds(self, word: &[char], stem: &[char]) -> bool {
        match self {
            Cond::Always => true,
            Cond::M0 => measure(stem) > 0,
            Cond::M1 => measure(stem) > 1,
            Cond::M1st => measure(stem) > 1 && matches!(stem.last(), Some('s' | 't')),
            Cond::Logi => measure(&word[..word.len() - 3]) > 0,
        }
    }
}

/// The first rule whose suffix matches decides: replaced when its condition holds, else the word
/// is returned unchanged (later rules are not tried).
fn apply_rules(w: Vec<char>, rules: &[(&str, &str, Cond)]) -> Vec<char> {
    for &(suffix, repl, cond) in rules {
        if ends_with(&w, suffix) {
            let n = suffix.chars().count();
            let stem = &w[..w.len() - n];
            return if cond.holds(&w, stem) { replaced(&w, n, repl) } else { w };
        }
    }
    w
}

fn step1a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ies") && w.len() == 4 {
        return replaced(&w, 3, "ie");
    }
    apply_rules(w, &[("sses", "ss", Cond::Always), ("ies", "i", Cond::Always), ("ss", "ss", Cond::Always), ("s", "", Cond::Always)])
}

fn step1b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ied") {
        return replaced(&w, 3, if w.len() == 4 { "ie" } else { "i" });
    }
    if ends_with(&w, "eed") {
        let stem = &w[..w.len() - 3];
        return if measure(stem) > 0 { replaced(&w, 3, "ee") } else { w };
    }
    let mut stem: Option<Vec<char>> = None;
    for suffix in ["ed", "ing"] {
        if ends_with(&w, suffix) {
            let s = &w[..w.len() - suffix.len()];
            if contains_vowel(s) {
                stem = Some(s.to_vec());
                break;
            }
        }
    }
    let Some(s) = stem else { return w };
    for (suffix, repl) in [("at", "ate"), ("bl", "ble"), ("iz", "ize")] {
        if ends_with(&s, suffix) {
            return replaced(&s, 2, repl);
        }
    }
    if ends_double_consonant(&s) {
        let last = s[s.len() - 1];
        return if matches!(last, 'l' | 's' | 'z') { s } else { s[..s.len() - 1].to_vec() };
    }
    if measure(&s) == 1 && ends_cvc(&s) {
        return replaced(&s, 0, "e");
    }
    s
}

fn step1c(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "y") {
        let stem = &w[..w.len() - 1];
        // NLTK: y -> i only after a consonant that is not the whole stem.
        return if stem.len() > 1 && is_consonant(stem, stem.len() - 1) { replaced(&w, 1, "i") } else { w };
    }
    w
}

fn step2(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "alli") && measure(&w[..w.len() - 4]) > 0 {
        return step2(replaced(&w, 4, "al"));
    }
    use Cond::M0;
    apply_rules(
        w,
        &[
            ("ational", "ate", M0),
            ("tional", "tion", M0),
            ("enci", "ence", M0),
            ("anci", "ance", M0),
            ("izer", "ize", M0),
            ("bli", "ble", M0),
            ("alli", "al", M0),
            ("entli", "ent", M0),
            ("eli", "e", M0),
            ("ousli", "ous", M0),
            ("ization", "ize", M0),
            ("ation", "ate", M0),
            ("ator", "ate", M0),
            ("alism", "al", M0),
            ("iveness", "ive", M0),
            ("fulness", "ful", M0),
            ("ousness", "ous", M0),
            ("aliti", "al", M0),
            ("iviti", "ive", M0),
            ("biliti", "ble", M0),
            ("fulli", "ful", M0),
            ("logi", "log", Cond::Logi),
        ],
    )
}

fn step3(w: Vec<char>) -> Vec<char> {
    use Cond::M0;
    apply_rules(
        w,
        &[
            ("icate", "ic", M0),
            ("ative", "", M0),
            ("alize", "al", M0),
            ("iciti", "ic", M0),
            ("ical", "ic", M0),
            ("ful", "", M0),
            ("ness", "", M0),
        ],
    )
}

fn step4(w: Vec<char>) -> Vec<char> {
    use Cond::M1;
    apply_rules(
        w,
        &[
            ("al", "", M1),
            ("ance", "", M1),
            ("ence", "", M1),
            ("er", "", M1),
            ("ic", "", M1),
            ("able", "", M1),
            ("ible", "", M1),
            ("ant", "", M1),
            ("ement", "", M1),
            ("ment", "", M1),
            ("ent", "", M1),
            ("ion", "", Cond::M1st),
            ("ou", "", M1),
            ("ism", "", M1),
            ("ate", "", M1),
            ("iti", "", M1),
            ("ous", "", M1),
            ("ive", "", M1),
            ("ize", "", M1),
        ],
    )
}

fn step5a(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "e") {
        let stem = &w[..w.len() - 1];
        let m = measure(stem);
        if m > 1 || (m == 1 && !ends_cvc(stem)) {
            return stem.to_vec();
        }
    }
    w
}

fn step5b(w: Vec<char>) -> Vec<char> {
    if ends_with(&w, "ll") && measure(&w[..w.len() - 1]) > 1 {
        return w[..w.len() - 1].to_vec();
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_examples_stem_as_documented() {
        let s = PorterStemmer::new();
        for (w, want) in [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "tie"),
            ("cats", "cat"),
            ("agreed", "agre"),
            ("hopping", "hop"),
            ("filing", "file"),
            ("happy", "happi"),
            ("enjoy", "enjoy"),
            ("relational", "relat"),
            ("generously", "gener"),
            ("running", "run"),
            ("dying", "die"),
            ("controll", "control"),
        ] {
            assert_eq!(s.stem(w), want, "{w}");
        }
    }
}
