//! The one synthetic workload generator of the project (the CLI, the Python
//! benchmarks, the criterion benches and the long run all draw from it):
//! deterministic for a seed, the same numbers on every machine.

use crate::simulate::SimRequest;

/// xorshift64* pseudo-random numbers.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // splitmix the seed so that nearby seeds give unrelated streams
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next_u64() % (u64::from(hi - lo) + 1)) as u32
    }

    /// Uniform in `(0, 1)`.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// How a length is drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lengths {
    /// Log-normal around `median` with shape `sigma`, rounded.
    LogNormal { median: f64, sigma: f64 },
    /// Uniform in `lo..=hi`.
    Uniform { lo: u32, hi: u32 },
}

impl Lengths {
    fn check(&self, name: &str) -> Result<(), String> {
        match *self {
            Self::LogNormal { median, sigma } => {
                if !(median.is_finite() && median > 0.0) {
                    return Err(format!("{name} median must be a finite number > 0, got {median}"));
                }
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(format!("sigma must be a finite number >= 0, got {sigma}"));
                }
            }
            Self::Uniform { lo, hi } => {
                if lo < 1 || lo > hi {
                    return Err(format!("{name} range must be 1 <= lo <= hi, got ({lo}, {hi})"));
                }
            }
        }
        Ok(())
    }

    fn draw(&self, rng: &mut XorShift) -> f64 {
        match *self {
            Self::LogNormal { median, sigma } => (median.ln() + sigma * rng.normal()).exp().round(),
            Self::Uniform { lo, hi } => f64::from(rng.range(lo, hi)),
        }
    }
}

/// A stream of requests: Poisson arrivals (exponential gaps of mean
/// `mean_interarrival` steps; 0 puts every request at step 0), prompt
/// lengths and max_tokens drawn from their [`Lengths`], clipped so that every
/// request fits `max_model_len` (prompt `1..max_model_len`, at least one
/// token). An endless iterator; `take(n)` for a workload of `n`.
#[derive(Clone, Debug)]
pub struct Synthetic {
    rng: XorShift,
    max_model_len: u32,
    mean_interarrival: f64,
    prompt: Lengths,
    tokens: Lengths,
    clock: f64,
}

impl Synthetic {
    pub fn new(
        seed: u64,
        max_model_len: u32,
        mean_interarrival: f64,
        prompt: Lengths,
        tokens: Lengths,
    ) -> Result<Self, String> {
        if max_model_len < 2 {
            return Err(format!("max_model_len must be at least 2, got {max_model_len}"));
        }
        if !(mean_interarrival.is_finite() && mean_interarrival >= 0.0) {
            return Err(format!("mean_interarrival must be a finite number >= 0, got {mean_interarrival}"));
        }
        prompt.check("prompt")?;
        tokens.check("max_tokens")?;
        Ok(Self { rng: XorShift::new(seed), max_model_len, mean_interarrival, prompt, tokens, clock: 0.0 })
    }
}

impl Iterator for Synthetic {
    type Item = SimRequest;

    fn next(&mut self) -> Option<SimRequest> {
        if self.mean_interarrival > 0.0 {
            self.clock += -self.mean_interarrival * self.rng.unit().ln();
        }
        let mml = f64::from(self.max_model_len);
        let prompt = self.prompt.draw(&mut self.rng).clamp(1.0, mml - 1.0);
        let tokens = self.tokens.draw(&mut self.rng).clamp(1.0, mml - prompt);
        Some(SimRequest::new(self.clock.min(4e18) as u64, prompt as u32, tokens as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_within_limits() {
        let ln = |m| Lengths::LogNormal { median: m, sigma: 1.0 };
        let a: Vec<_> = Synthetic::new(7, 512, 4.0, ln(200.0), ln(100.0)).unwrap().take(2000).collect();
        let b: Vec<_> = Synthetic::new(7, 512, 4.0, ln(200.0), ln(100.0)).unwrap().take(2000).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|r| r.prompt_len >= 1 && r.max_tokens >= 1 && r.prompt_len + r.max_tokens <= 512));
        assert!(a.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        let mean_gap = a.last().unwrap().arrival as f64 / 2000.0;
        assert!((3.5..4.5).contains(&mean_gap), "{mean_gap}");
        let mut p: Vec<u32> = a.iter().map(|r| r.prompt_len).collect();
        p.sort_unstable();
        assert!((170..230).contains(&p[1000]), "median prompt {}", p[1000]);
        let u = Lengths::Uniform { lo: 16, hi: 448 };
        let c: Vec<_> = Synthetic::new(1, 4096, 0.0, u, u).unwrap().take(500).collect();
        assert!(c.iter().all(|r| r.arrival == 0 && (16..=448).contains(&r.prompt_len)));
        assert!(Synthetic::new(1, 512, f64::NAN, u, u).is_err());
        assert!(Synthetic::new(1, 512, 1.0, ln(-5.0), u).is_err());
    }
}
