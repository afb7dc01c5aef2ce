//! The volumetric staircase both policies check: how large `batch x tkv`
//! gets from now until a joining request ends, when the batch shrinks as its
//! other requests finish.

/// Largest `batch x end` over the staircase: `ends` are the tkv at which
/// each other running request ends (any order; sorted in place), `end_new`
/// the joining request's. While requests end before the joining one the
/// batch shrinks by one at each end; the first that ends at or after it
/// leaves the joining request's end as the last stair. `count_alone` adds
/// the stair where the joining request runs alone (the continuous policy
/// checks it; the chunked policy's published check does not).
pub fn peak_volume(ends: &mut [u64], end_new: u64, count_alone: bool) -> u64 {
    ends.sort_unstable();
    let mut batch = ends.len() as u64 + 1;
    let mut peak = 0;
    for &e in ends.iter() {
        if e >= end_new {
            return peak.max(batch * end_new);
        }
        peak = peak.max(batch * e);
        batch -= 1;
    }
    if count_alone {
        peak = peak.max(end_new);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staircase() {
        // ends 110 and 300 around a new end of 200: max(3 x 110, 2 x 200)
        assert_eq!(peak_volume(&mut [300, 110], 200, true), 400);
        // every other request ends first: the new one alone at the end
        assert_eq!(peak_volume(&mut [65], 263, true), 263);
        assert_eq!(peak_volume(&mut [65], 263, false), 130);
        assert_eq!(peak_volume(&mut [], 50, true), 50);
        assert_eq!(peak_volume(&mut [], 50, false), 0);
    }
}
