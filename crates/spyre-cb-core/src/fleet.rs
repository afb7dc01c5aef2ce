//! Fleet sizing by simulation: `replicas` exact schedulers of one
//! configuration behind a routing rule, stepped in lockstep (a step takes as
//! long on every replica), over one workload.
//!
//! Each request is routed when it arrives, by the replicas' state at that
//! step: [`Router::LeastLoaded`] picks the replica with the fewest
//! outstanding sequences (waiting + running + paused; ties: the lowest
//! index), [`Router::RoundRobin`] the next in turn, and
//! [`Router::PrefixAffinity`] the replica whose prefix cache holds the most
//! of the prompt among those within `slack` sequences of the least loaded
//! (the chunked policy with prefix caching; elsewhere it is least-loaded).
//! Requests run exactly as [`crate::simulate`] runs them.

use std::collections::{BTreeMap, HashMap};

use crate::block_pool::{chain_hash, BlockHash};
use crate::config::SchedulerConfig;
use crate::error::{CoreError, InvalidRequest};
use crate::latency::LatencySummary;
use crate::record::Counters;
use crate::scheduler::{PlanDetail, Scheduler, UpdateOutcome};
use crate::simulate::{Interrupted, SimRequest, Timing, NO_MATCH_TOKEN};
use crate::StepPlan;
use crate::BLOCK_SIZE;

/// How a fleet routes an arriving request (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Router {
    LeastLoaded,
    RoundRobin,
    PrefixAffinity { slack: u32 },
}

impl Router {
    /// `"least-loaded"`, `"round-robin"` or `"prefix-affinity"` (slack 4).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "least-loaded" => Some(Self::LeastLoaded),
            "round-robin" => Some(Self::RoundRobin),
            "prefix-affinity" => Some(Self::PrefixAffinity { slack: 4 }),
            _ => None,
        }
    }
    pub const NAMES: [&'static str; 3] = ["least-loaded", "round-robin", "prefix-affinity"];

    /// The rule's name, as [`Router::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::LeastLoaded => Self::NAMES[0],
            Self::RoundRobin => Self::NAMES[1],
            Self::PrefixAffinity { .. } => Self::NAMES[2],
        }
    }

    /// The replica a request with `prompt` goes to (`turn`: requests routed so far).
    pub fn route(self, replicas: &[Scheduler], prompt: &[u32], turn: u64) -> usize {
        let loads: Vec<Option<u64>> =
            replicas.iter().map(|s| Some((s.n_waiting() + s.n_running() + s.n_paused()) as u64)).collect();
        let hit = |i: usize| if prompt.is_empty() { 0 } else { replicas[i].cached_prefix_blocks(prompt) };
        self.choose(&loads, hit, turn).expect("a fleet has replicas")
    }

    /// The rule itself, over what a router knows of each replica: its load
    /// (outstanding sequences; `None`: down, never chosen) and, for prefix
    /// affinity, how many blocks of the prompt it holds cached (`hit`).
    /// `None` when every replica is down.
    pub fn choose(self, loads: &[Option<u64>], hit: impl Fn(usize) -> u32, turn: u64) -> Option<usize> {
        let up = || (0..loads.len()).filter(|&i| loads[i].is_some());
        let load = |i: usize| loads[i].unwrap_or(u64::MAX);
        let least = up().min_by_key(|&i| (load(i), i))?;
        Some(match self {
            Self::LeastLoaded => least,
            Self::RoundRobin => {
                let n = loads.len() as u64;
                (0..n).map(|k| ((turn + k) % n) as usize).find(|&i| loads[i].is_some())?
            }
            Self::PrefixAffinity { slack } => {
                let min = load(least);
                up().filter(|&i| load(i) <= min + u64::from(slack))
                    .max_by_key(|&i| (hit(i), std::cmp::Reverse(load(i)), std::cmp::Reverse(i)))?
            }
        })
    }
}

/// A router's estimate of one replica's prefix cache: the chained hashes of
/// the full prompt blocks it routed there, the most recently routed kept, at
/// most `capacity` blocks (the replica's pool). A server routing to replicas
/// in other processes cannot read their caches; this is what it sent them.
#[derive(Clone, Debug, Default)]
pub struct PrefixIndex {
    capacity: usize,
    tick: u64,
    /// block hash -> when it was last routed
    seen: HashMap<BlockHash, u64>,
    /// when -> block hash (the oldest first: evicted first)
    order: BTreeMap<u64, BlockHash>,
}

impl PrefixIndex {
    pub fn new(capacity_blocks: u32) -> Self {
        Self { capacity: capacity_blocks as usize, ..Self::default() }
    }

    /// The prompt's full blocks that can be a cache hit (a prefill recomputes at
    /// least its last token: at most `len - 1` tokens), as chained hashes.
    fn hashes(prompt: &[u32]) -> impl Iterator<Item = BlockHash> + '_ {
        let usable = prompt.len().saturating_sub(1) / BLOCK_SIZE as usize;
        prompt.chunks_exact(BLOCK_SIZE as usize).take(usable).scan(0 as BlockHash, |parent, block| {
            *parent = chain_hash(*parent, block);
            Some(*parent)
        })
    }

    /// Leading full blocks of `prompt` this replica was sent (an estimate of its hit).
    pub fn cached_blocks(&self, prompt: &[u32]) -> u32 {
        Self::hashes(prompt).take_while(|h| self.seen.contains_key(h)).count() as u32
    }

    /// Records that `prompt` was routed here (its blocks become the most recent).
    pub fn insert(&mut self, prompt: &[u32]) {
        for h in Self::hashes(prompt) {
            self.tick += 1;
            if let Some(old) = self.seen.insert(h, self.tick) {
                self.order.remove(&old);
            }
            self.order.insert(self.tick, h);
        }
        while self.seen.len() > self.capacity {
            let Some((_, h)) = self.order.pop_first() else { break };
            self.seen.remove(&h);
        }
    }

    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The routing state of a data-parallel server: the rule, the turn, and (for
/// prefix affinity) one [`PrefixIndex`] per replica.
#[derive(Clone, Debug)]
pub struct FleetRouter {
    pub rule: Router,
    turn: u64,
    indexes: Vec<PrefixIndex>,
}

impl FleetRouter {
    pub fn new(rule: Router, replicas: usize, capacity_blocks: u32) -> Self {
        Self { rule, turn: 0, indexes: vec![PrefixIndex::new(capacity_blocks); replicas] }
    }

    pub fn replicas(&self) -> usize {
        self.indexes.len()
    }

    /// The replica for a request with `prompt` given the replicas' `loads`
    /// (`None`: down); `None` when all are down. The prompt is recorded in the
    /// chosen replica's index.
    pub fn route(&mut self, loads: &[Option<u64>], prompt: &[u32]) -> Option<usize> {
        assert_eq!(loads.len(), self.indexes.len(), "one load per replica");
        let affinity = matches!(self.rule, Router::PrefixAffinity { .. });
        let idx = &self.indexes;
        let r = self.rule.choose(loads, |i| if affinity { idx[i].cached_blocks(prompt) } else { 0 }, self.turn)?;
        self.turn += 1;
        if affinity {
            self.indexes[r].insert(prompt);
        }
        Some(r)
    }

    /// The estimate of replica `r`'s cache (blocks of `prompt` it holds).
    pub fn cached_blocks(&self, r: usize, prompt: &[u32]) -> u32 {
        self.indexes[r].cached_blocks(prompt)
    }

    /// Replica `r` restarted: its cache is empty.
    pub fn forget(&mut self, r: usize) {
        self.indexes[r].clear();
    }
}

/// One replica's share of a fleet simulation.
#[derive(Clone, Debug, Default)]
pub struct ReplicaStats {
    /// Requests routed to it (accepted).
    pub requests: u32,
    /// Steps it ran a prefill, chunk or decode (of the fleet's `steps`).
    pub busy_steps: u64,
    /// Waiting requests: summed over steps (for the mean) and the most at once.
    pub waiting_sum: u64,
    pub max_waiting: u32,
    /// TTFT and ITL (steps) of its requests.
    pub latency: LatencySummary,
    pub counters: Counters,
}

/// A fleet simulation's outcome.
#[derive(Clone, Debug, Default)]
pub struct FleetStats {
    /// Steps until every request finished (or the `steps` asked for).
    pub steps: u64,
    pub replicas: Vec<ReplicaStats>,
    /// The replica each request went to (`u32::MAX`: rejected).
    pub assignment: Vec<u32>,
    pub rejected: Vec<(u32, InvalidRequest)>,
    /// TTFT and ITL (steps) over every request.
    pub latency: LatencySummary,
}

/// Runs `requests` through `replicas` schedulers of `cfg` behind `router`.
pub fn simulate_fleet(
    cfg: SchedulerConfig,
    requests: &[SimRequest],
    replicas: usize,
    router: Router,
    steps: Option<u64>,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<FleetStats, Interrupted> {
    assert!(replicas >= 1, "a fleet has at least one replica");
    let mut fleet: Vec<Scheduler> = (0..replicas).map(|_| Scheduler::new(cfg.clone())).collect();
    let mut st = FleetStats {
        replicas: vec![ReplicaStats::default(); replicas],
        assignment: vec![u32::MAX; requests.len()],
        ..FleetStats::default()
    };
    let mut timing = Timing::new(requests);
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let (mut next, mut turn) = (0, 0u64);
    let mut tokens = Vec::new();
    let mut outcome = UpdateOutcome::default();
    let last = steps.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let drained = |f: &[Scheduler]| f.iter().all(|s| s.is_drained() && s.tkv() == 0);
    loop {
        if n % 4096 == 4095 && interrupt() {
            return Err(Interrupted);
        }
        if n > 0 {
            // everyone idle until the next arrival: jump there
            if drained(&fleet) {
                if let Some(&i) = order.get(next) {
                    let until = requests[i].arrival.min(last);
                    if until > n {
                        for s in &mut fleet {
                            s.skip_idle_steps(until - n);
                        }
                        n = until;
                    }
                }
            }
            if n > last {
                break;
            }
            for (r, s) in fleet.iter_mut().enumerate() {
                let plan = s.schedule_with(PlanDetail::Minimal).expect("no step is pending between simulation steps");
                timing.planned(s, &plan, n);
                if !matches!(plan, StepPlan::Idle) {
                    st.replicas[r].busy_steps += 1;
                }
                tokens.clear();
                for q in s.last_outputs() {
                    let g = s.generated(q.id).unwrap_or(0) as usize;
                    tokens.push(requests[q.tag as usize].outputs.get(g).copied().unwrap_or(NO_MATCH_TOKEN));
                }
                s.update_into(&tokens, &[], &[], &mut outcome).expect("one token per sampling sequence");
            }
        }
        while next < order.len() && requests[order[next]].arrival <= n {
            let i = order[next];
            let q = &requests[i];
            let r = router.route(&fleet, &q.prompt, turn);
            turn += 1;
            let s = &mut fleet[r];
            let added = if q.prompt.is_empty() {
                s.add_request_tagged(&q.name(i), i as u32, q.prompt_len, q.max_tokens)
            } else {
                s.add_request_tokens_tagged(&q.name(i), i as u32, q.prompt.clone(), q.max_tokens)
            };
            match added {
                Ok(()) => {
                    st.assignment[i] = r as u32;
                    st.replicas[r].requests += 1;
                }
                Err(CoreError::InvalidRequest(e)) => st.rejected.push((i as u32, e)),
                Err(e) => unreachable!("adding a request only fails validation: {e}"),
            }
            next += 1;
        }
        for (r, s) in fleet.iter().enumerate() {
            timing.observed(s, n);
            let w = s.n_waiting() as u32;
            st.replicas[r].waiting_sum += u64::from(w);
            st.replicas[r].max_waiting = st.replicas[r].max_waiting.max(w);
        }
        match steps {
            Some(s) if n >= s => break,
            None if next == order.len() && drained(&fleet) => break,
            _ => {}
        }
        n += 1;
    }
    st.steps = n;
    for (r, s) in fleet.iter().enumerate() {
        st.replicas[r].counters = s.counters();
        let mine = &st.assignment;
        st.replicas[r].latency = timing.latency.summary_of(|i| mine[i] == r as u32);
    }
    st.latency = timing.latency.summary();
    Ok(st)
}

/// The fewest replicas (1..=`max_replicas`) whose fleet meets `ttft_p99` and
/// `itl_p99` (steps; `None`: no target) on `requests`, with its stats; `None`
/// when even `max_replicas` do not.
pub fn fleet_size(
    cfg: &SchedulerConfig,
    requests: &[SimRequest],
    router: Router,
    ttft_p99: Option<f64>,
    itl_p99: Option<f64>,
    max_replicas: usize,
    interrupt: &mut dyn FnMut() -> bool,
) -> Result<Option<(usize, FleetStats)>, Interrupted> {
    let meets = |st: &FleetStats| {
        ttft_p99.is_none_or(|t| st.latency.ttft.p99 <= t) && itl_p99.is_none_or(|t| st.latency.itl.p99 <= t)
    };
    // more replicas never hurt a lockstep fleet's latency much; search upward (N is small)
    for n in 1..=max_replicas {
        let st = simulate_fleet(cfg.clone(), requests, n, router, None, interrupt)?;
        if meets(&st) {
            return Ok(Some((n, st)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::simulate_stats;

    fn work(n: usize, gap: u64) -> Vec<SimRequest> {
        (0..n).map(|i| SimRequest::new(i as u64 * gap, 20 + (i as u32 * 37) % 150, 10 + (i as u32 * 53) % 90)).collect()
    }

    #[test]
    fn one_replica_is_the_plain_simulation() {
        let cfg = SchedulerConfig::new(4, 512, None, None).unwrap();
        let reqs = work(40, 3);
        let fleet = simulate_fleet(cfg.clone(), &reqs, 1, Router::LeastLoaded, None, &mut || false).unwrap();
        let plain = simulate_stats(cfg, &reqs, None, false, &mut || false).unwrap();
        assert_eq!(fleet.latency, plain.latency.summary());
        assert_eq!(fleet.replicas[0].counters, plain.counters);
        assert_eq!(fleet.replicas[0].requests, 40);
    }

    #[test]
    fn each_replica_runs_exactly_its_share() {
        // a replica's requests, simulated alone at the same arrivals, give the same latencies
        let cfg = SchedulerConfig::new(2, 512, None, None).unwrap();
        let reqs = work(60, 2);
        for router in [Router::LeastLoaded, Router::RoundRobin] {
            let fleet = simulate_fleet(cfg.clone(), &reqs, 3, router, None, &mut || false).unwrap();
            assert_eq!(fleet.replicas.iter().map(|r| r.requests).sum::<u32>(), 60);
            for r in 0..3u32 {
                let mine: Vec<SimRequest> =
                    (0..reqs.len()).filter(|&i| fleet.assignment[i] == r).map(|i| reqs[i].clone()).collect();
                let alone = simulate_stats(cfg.clone(), &mine, None, false, &mut || false).unwrap();
                assert_eq!(fleet.replicas[r as usize].latency, alone.latency.summary(), "{router:?} replica {r}");
            }
        }
    }

    #[test]
    fn more_replicas_cut_the_queue_and_sizing_finds_the_fewest() {
        let cfg = SchedulerConfig::new(2, 512, None, None).unwrap();
        let reqs = work(80, 1);
        let one = simulate_fleet(cfg.clone(), &reqs, 1, Router::LeastLoaded, None, &mut || false).unwrap();
        let four = simulate_fleet(cfg.clone(), &reqs, 4, Router::LeastLoaded, None, &mut || false).unwrap();
        assert!(four.latency.ttft.p99 < one.latency.ttft.p99 / 2.0, "{:?} vs {:?}", four.latency, one.latency);
        let target = four.latency.ttft.p99;
        let (n, st) = fleet_size(&cfg, &reqs, Router::LeastLoaded, Some(target), None, 8, &mut || false)
            .unwrap()
            .expect("4 replicas meet it");
        assert!(n <= 4 && st.latency.ttft.p99 <= target);
        if n > 1 {
            let fewer = simulate_fleet(cfg, &reqs, n - 1, Router::LeastLoaded, None, &mut || false).unwrap();
            assert!(fewer.latency.ttft.p99 > target);
        }
    }

    #[test]
    fn prefix_affinity_sends_shared_prompts_where_they_are_cached() {
        use crate::config::{ChunkOptions, Policy};
        let opts = ChunkOptions { chunk_size: 64, prefix_caching: true, ..Default::default() };
        let cfg = SchedulerConfig::with_policy(4, 1024, None, None, Policy::Chunked(opts)).unwrap();
        // three system prompts of 256 tokens, each followed by a short question
        let reqs: Vec<SimRequest> = (0..48)
            .map(|i| {
                let mut p: Vec<u32> = (0..256).map(|t| (t + 1000 * (i % 3)) as u32).collect();
                p.extend((0..20).map(|t| 5000 + i as u32 * 20 + t));
                SimRequest {
                    arrival: i as u64 * 6,
                    prompt_len: p.len() as u32,
                    prompt: p,
                    max_tokens: 16,
                    ..Default::default()
                }
            })
            .collect();
        let hits = |router| {
            let st = simulate_fleet(cfg.clone(), &reqs, 2, router, None, &mut || false).unwrap();
            st.replicas.iter().map(|r| r.counters.prefix_cached_blocks).sum::<u64>()
        };
        let (affine, round) = (hits(Router::PrefixAffinity { slack: 4 }), hits(Router::RoundRobin));
        assert!(affine > round, "affinity {affine} vs round-robin {round} cached blocks");
    }

    #[test]
    fn the_rule_skips_replicas_that_are_down() {
        let none = |_: usize| 0;
        assert_eq!(Router::LeastLoaded.choose(&[Some(3), None, Some(2)], none, 0), Some(2));
        assert_eq!(Router::LeastLoaded.choose(&[None, None], none, 0), None);
        // round robin: the next in turn that is up
        let turns: Vec<_> = (0..4).map(|t| Router::RoundRobin.choose(&[Some(0), None, Some(0)], none, t)).collect();
        assert_eq!(turns, [Some(0), Some(2), Some(2), Some(0)]);
        // prefix affinity: the best hit within the slack of the least loaded, never a down one
        let hit = |i: usize| [0, 9, 5, 7][i];
        let rule = Router::PrefixAffinity { slack: 2 };
        assert_eq!(rule.choose(&[Some(1), None, Some(3), Some(4)], hit, 0), Some(2));
    }

    #[test]
    fn a_fleet_router_sends_a_shared_prefix_where_it_sent_it_before() {
        let sys: Vec<u32> = (0..200).collect(); // 3 full blocks
        let prompt = |tail: u32| -> Vec<u32> { sys.iter().copied().chain([1000 + tail, 7]).collect() };
        let mut r = FleetRouter::new(Router::PrefixAffinity { slack: 4 }, 2, 64);
        let first = r.route(&[Some(1), Some(0)], &prompt(0)).unwrap();
        assert_eq!(first, 1, "no hit anywhere: the least loaded");
        assert_eq!(r.cached_blocks(1, &prompt(1)), 3);
        // replica 1 is busier now but within the slack: the prefix wins
        assert_eq!(r.route(&[Some(0), Some(3)], &prompt(1)), Some(1));
        // beyond the slack, load wins
        assert_eq!(r.route(&[Some(0), Some(5)], &prompt(2)), Some(0));
        r.forget(1);
        assert_eq!(r.cached_blocks(1, &prompt(3)), 0);
        // least-loaded keeps no index
        let mut ll = FleetRouter::new(Router::LeastLoaded, 2, 64);
        assert_eq!(ll.route(&[Some(2), Some(1)], &prompt(0)), Some(1));
        assert_eq!(ll.cached_blocks(1, &prompt(0)), 0);
    }

    #[test]
    fn a_prefix_index_keeps_the_most_recent_blocks_within_its_capacity() {
        let mut ix = PrefixIndex::new(4);
        let a: Vec<u32> = (0..3 * 64 + 1).collect();
        let b: Vec<u32> = (5000..5000 + 2 * 64 + 1).collect();
        ix.insert(&a);
        assert_eq!(ix.cached_blocks(&a), 3);
        // a prompt of exactly 3 blocks can use only 2 (its last token is recomputed)
        assert_eq!(ix.cached_blocks(&a[..3 * 64]), 2);
        ix.insert(&b);
        assert_eq!(ix.len(), 4, "capacity");
        assert_eq!(ix.cached_blocks(&b), 2);
        // a's oldest blocks went first: its chain is broken at the start
        assert_eq!(ix.cached_blocks(&a), 0);
    }
}
