//! Stop strings, matched as a request's text grows.
//!
//! A request may end on text (a stop string) rather than on a token. Its
//! text arrives a few characters per step, and each step must say whether a
//! stop string now occurs and how much of the text's end may still be the
//! start of one (a stream holds that back). Searching every stop string in
//! the text's tail each step costs their total length per step; here each
//! stop string keeps its Knuth-Morris-Pratt state across steps, so a step
//! costs O(stop strings x new characters), whatever their lengths.
//!
//! Characters are Unicode scalar values (Python's `str` indexing).

/// The stop strings of one request and how much of each the text's end matches.
#[derive(Clone, Debug)]
pub struct StopStrings {
    stops: Vec<Kmp>,
    /// Characters fed so far.
    fed: u64,
}

/// Where a stop string first occurs in the text fed so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopMatch {
    /// Index of the stop string (in the order given).
    pub stop: usize,
    /// Character offset in the whole text where the occurrence starts.
    pub start: u64,
    /// Its length in characters.
    pub len: u64,
}

#[derive(Clone, Debug)]
struct Kmp {
    pattern: Vec<char>,
    /// `fail[i]`: length of the longest proper prefix of `pattern[..=i]` that is also its suffix.
    fail: Vec<u32>,
    /// Characters of the pattern the text's end matches now.
    matched: u32,
}

impl Kmp {
    fn new(s: &str) -> Self {
        let pattern: Vec<char> = s.chars().collect();
        let mut fail = vec![0u32; pattern.len()];
        let mut k = 0usize;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fail[k - 1] as usize;
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fail[i] = k as u32;
        }
        Kmp { pattern, fail, matched: 0 }
    }

    /// Advances by one character; true when the whole pattern now ends here.
    #[inline]
    fn push(&mut self, c: char) -> bool {
        let mut k = self.matched as usize;
        if k == self.pattern.len() {
            k = self.fail[k - 1] as usize; // overlapping occurrences
        }
        while k > 0 && self.pattern[k] != c {
            k = self.fail[k - 1] as usize;
        }
        if self.pattern[k] == c {
            k += 1;
        }
        self.matched = k as u32;
        k == self.pattern.len()
    }
}

impl StopStrings {
    /// `None` when a stop string is empty (it would match everywhere).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Option<Self> {
        if stops.iter().any(|s| s.as_ref().is_empty()) {
            return None;
        }
        Some(Self { stops: stops.iter().map(|s| Kmp::new(s.as_ref())).collect(), fed: 0 })
    }

    pub fn len(&self) -> usize {
        self.stops.len()
    }
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }
    /// Characters fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Appends `text` to the text; returns the first stop string (in the
    /// order given) that occurs ending inside `text`, at its first such
    /// occurrence — as searching each stop string, in order, in the text's
    /// new tail would find it.
    pub fn feed(&mut self, text: &str) -> Option<StopMatch> {
        let mut found: Option<StopMatch> = None;
        for c in text.chars() {
            self.fed += 1;
            for (i, s) in self.stops.iter_mut().enumerate() {
                if s.push(c) && found.is_none_or(|f| i < f.stop) {
                    let len = s.pattern.len() as u64;
                    found = Some(StopMatch { stop: i, start: self.fed - len, len });
                }
            }
        }
        found
    }

    /// Characters at the text's end that may still be the start of a stop
    /// string (the longest such suffix; 0 when none can be).
    pub fn held(&self) -> u64 {
        self.stops
            .iter()
            .map(|s| if s.matched as usize == s.pattern.len() { 0 } else { u64::from(s.matched) })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What searching each stop string in the new tail finds (the reference).
    fn naive(stops: &[&str], before: &str, new: &str) -> Option<(usize, u64)> {
        let text: Vec<char> = before.chars().chain(new.chars()).collect();
        let b = before.chars().count();
        for (i, s) in stops.iter().enumerate() {
            let p: Vec<char> = s.chars().collect();
            if text.len() < p.len() {
                continue;
            }
            let from = b.saturating_sub(p.len() - 1);
            if let Some(at) = (from..=text.len().saturating_sub(p.len())).find(|&at| text[at..at + p.len()] == p[..]) {
                if at + p.len() > b {
                    return Some((i, at as u64));
                }
            }
        }
        None
    }

    fn naive_held(stops: &[&str], text: &str) -> u64 {
        let t: Vec<char> = text.chars().collect();
        let mut best = 0;
        for s in stops {
            let p: Vec<char> = s.chars().collect();
            for k in (1..p.len().min(t.len() + 1)).rev() {
                if t[t.len() - k..] == p[..k] {
                    best = best.max(k as u64);
                    break;
                }
            }
        }
        best
    }

    #[test]
    fn agrees_with_searching_the_tail() {
        let mut seed = 7u64;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let alphabet = ['a', 'b', 'é', '🙂'];
        for _ in 0..2000 {
            let n_stops = 1 + rand(4) as usize;
            let stops: Vec<String> =
                (0..n_stops).map(|_| (0..1 + rand(5)).map(|_| alphabet[rand(4) as usize]).collect()).collect();
            let refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let mut m = StopStrings::new(&refs).unwrap();
            let mut text = String::new();
            for _ in 0..12 {
                let piece: String = (0..rand(4)).map(|_| alphabet[rand(4) as usize]).collect();
                let want = naive(&refs, &text, &piece);
                let got = m.feed(&piece).map(|f| (f.stop, f.start));
                assert_eq!(got, want, "stops {refs:?} text {text:?} + {piece:?}");
                text.push_str(&piece);
                if got.is_some() {
                    break;
                }
                assert_eq!(m.held(), naive_held(&refs, &text), "stops {refs:?} text {text:?}");
            }
        }
    }

    #[test]
    fn empty_stop_strings_are_refused() {
        assert!(StopStrings::new(&["a", ""]).is_none());
        assert!(StopStrings::new::<&str>(&[]).is_some_and(|m| m.is_empty()));
    }
}
