//! Deterministic synthetic workloads for benchmarks and long runs (no
//! dependencies, same numbers on every machine).

/// xorshift64* pseudo-random numbers.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % u64::from(hi - lo + 1)) as u32
    }

    /// A valid `(prompt_len, max_tokens)`: prompt uniform in `1..=max_prompt`,
    /// max_tokens uniform in `1..=min(max_model_len - prompt, max_new)`.
    pub fn request(&mut self, max_model_len: u32, max_prompt: u32, max_new: u32) -> (u32, u32) {
        let pl = self.range(1, max_prompt.min(max_model_len - 1));
        let mt = self.range(1, (max_model_len - pl).min(max_new));
        (pl, mt)
    }
}
