//! When each request of a simulation emitted its tokens, and the latency
//! summaries (in steps) users compare policies by.

/// Per-request timing of a simulation, in steps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestTimes {
    pub arrival: u64,
    /// Step of its first prefill chunk (continuous policy: its prefill).
    pub scheduled: Option<u64>,
    /// Step that emitted the first token (`None`: rejected or never).
    pub first_token: Option<u64>,
    pub finished: Option<u64>,
    /// Steps between consecutive tokens.
    pub gaps: Vec<u32>,
    /// Longest stretch of consecutive paused steps.
    pub max_pause: u32,
}

/// Tracks when each request of a simulation emitted its tokens.
#[derive(Clone, Debug, Default)]
pub struct LatencyTracker {
    pub times: Vec<RequestTimes>,
    last: Vec<u64>,
    pause_run: Vec<u32>,
}

impl LatencyTracker {
    pub fn new(arrivals: impl Iterator<Item = u64>) -> Self {
        let times: Vec<RequestTimes> = arrivals.map(|arrival| RequestTimes { arrival, ..Default::default() }).collect();
        let n = times.len();
        Self { times, last: vec![0; n], pause_run: vec![0; n] }
    }
    /// Request `i` emitted a token in step `n`.
    pub fn token(&mut self, i: usize, n: u64) {
        let t = &mut self.times[i];
        if t.first_token.is_none() {
            t.first_token = Some(n);
        } else {
            t.gaps.push((n - self.last[i]) as u32);
        }
        self.last[i] = n;
        self.pause_run[i] = 0;
    }
    /// Request `i` ran its first prefill (chunk) in step `n` (later calls are ignored).
    pub fn scheduled(&mut self, i: usize, n: u64) {
        self.times[i].scheduled.get_or_insert(n);
    }
    /// Request `i` was paused in step `n`.
    pub fn paused(&mut self, i: usize) {
        self.pause_run[i] += 1;
        self.times[i].max_pause = self.times[i].max_pause.max(self.pause_run[i]);
    }
    pub fn finished(&mut self, i: usize, n: u64) {
        self.times[i].finished = Some(n);
    }
    /// Time to first token, inter-token latency and pause summaries (steps).
    pub fn summary(&self) -> LatencySummary {
        self.summary_of(|_| true)
    }

    /// [`LatencyTracker::summary`] of the requests `which` selects (by index).
    pub fn summary_of(&self, which: impl Fn(usize) -> bool) -> LatencySummary {
        let times = || self.times.iter().enumerate().filter(|(i, _)| which(*i)).map(|(_, t)| t);
        let mut ttft: Vec<u64> = times().filter_map(|t| t.first_token.map(|f| f.saturating_sub(t.arrival))).collect();
        let mut itl: Vec<u64> = times().flat_map(|t| t.gaps.iter().map(|&g| u64::from(g))).collect();
        LatencySummary {
            ttft: Summary::of(&mut ttft),
            itl: Summary::of(&mut itl),
            max_pause: times().map(|t| t.max_pause).max().unwrap_or(0),
        }
    }
}

/// Mean, median and 99th percentile of a sample (0 for an empty one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &mut [u64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        // nearest-rank percentiles
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] as f64;
        Self {
            n: v.len() as u64,
            mean: v.iter().sum::<u64>() as f64 / v.len() as f64,
            p50: rank(0.5),
            p99: rank(0.99),
            max: *v.last().unwrap() as f64,
        }
    }
}

/// What users compare policies by, in steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub ttft: Summary,
    pub itl: Summary,
    pub max_pause: u32,
}
