//! Rank selection without sorting: which elements of a tensor have a rank (by magnitude) in a
//! window `[lo, hi)`.
//!
//! Ranks are positions in ascending `(|x|, index)` order, i.e. a stable sort by magnitude. The
//! `k`-th value is found on the IEEE-754 bits of `|x|` (for non-negative floats the bit
//! pattern orders like the value) by sample-bracketed selection (Floyd–Rivest style): a sorted
//! sample of 32,768 keys brackets the wanted rank, one parallel pass counts the keys below the
//! bracket and gathers the few inside it, and `select_nth_unstable` on those gives the exact
//! key. A second, branch-free pass applies the window. O(n), exact, where mergekit sorts the
//! whole tensor (O(n log n)).

use rayon::prelude::*;

const CHUNK: usize = 1 << 16;

pub(crate) fn key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// Below this many elements a sequential `select_nth_unstable` on a copy is fastest.
pub const SMALL: usize = 1 << 17;
/// Sample size used to bracket the wanted rank.
const SAMPLE: usize = 1 << 15;

thread_local! {
    static GATHER: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sample positions: one per stratum of `n / SAMPLE` elements, jittered deterministically.
pub(crate) fn sample_positions(n: usize) -> Vec<usize> {
    (0..SAMPLE)
        .map(|j| {
            let lo = j * n / SAMPLE;
            let width = ((j + 1) * n / SAMPLE - lo).max(1);
            let jitter = (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (lo + (jitter as usize % width)).min(n - 1)
        })
        .collect()
}

/// A search for the key at ascending rank `r` among `n` keys seen in chunks.
///
/// A sorted sample brackets the rank by ±(4σ + 16) sample ranks (σ the binomial standard
/// deviation); [`observe`](Self::observe) counts the keys below the bracket and gathers the
/// (≈ 2 %) keys inside it; [`resolve`](Self::resolve) selects the exact key among those, or
/// reports a miss (rank outside the bracket, rare), after which [`widen`](Self::widen) and
/// another pass always succeed.
#[derive(Debug, Clone)]
pub struct RankSearch {
    r: usize,
    t_lo: u32,
    t_hi: u32,
    below: usize,
    inside: Vec<u32>,
}

/// A resolved rank: the key and how many keys are smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankKey {
    pub key: u32,
    pub below: usize,
}

impl RankSearch {
    /// `sorted_sample`: keys at [`sample_positions`], sorted.
    pub fn new(sorted_sample: &[u32], n: usize, r: usize) -> Self {
        let m = sorted_sample.len();
        let p = r as f64 / n as f64;
        let spread = 4.0 * (m as f64 * p * (1.0 - p)).sqrt() + 16.0;
        let centre = p * m as f64;
        let t_lo = if centre - spread <= 0.0 { 0 } else { sorted_sample[(centre - spread) as usize] };
        let t_hi = if centre + spread >= (m - 1) as f64 { u32::MAX } else { sorted_sample[(centre + spread) as usize] };
        Self { r, t_lo, t_hi, below: 0, inside: Vec::new() }
    }

    /// Accounts for one chunk of values (chunks may come in any order).
    pub fn observe(&mut self, chunk: &[f32]) {
        let (t_lo, t_hi) = self.bracket();
        let (below, inside) = chunk
            .par_chunks(CHUNK)
            .map(|c| {
                // branch-free gather into a per-thread buffer, then one copy of the hits
                GATHER.with_borrow_mut(|buf| {
                    buf.resize(CHUNK.max(c.len()), 0);
                    let (below, hits) = gather(c, t_lo, t_hi, buf);
                    (below, buf[..hits].to_vec())
                })
            })
            .reduce(
                || (0, Vec::new()),
                |(a, mut u), (b, v)| {
                    u.extend_from_slice(&v);
                    (a + b, u)
                },
            );
        self.add(below, &inside);
    }

    /// The keys `[t_lo, t_hi]` that [`observe`](Self::observe) gathers; keys below `t_lo` are
    /// only counted.
    pub fn bracket(&self) -> (u32, u32) {
        (self.t_lo, self.t_hi)
    }

    /// Accounts for values observed elsewhere: `below` keys under the bracket and the keys
    /// `inside` it (as [`gather`] returns them).
    pub fn add(&mut self, below: usize, inside: &[u32]) {
        self.below += below;
        self.inside.extend_from_slice(inside);
    }

    /// The ascending rank searched for.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The exact key, or `None` if the rank fell outside the bracket.
    pub fn resolve(&mut self) -> Option<RankKey> {
        if self.r < self.below || self.r >= self.below + self.inside.len() {
            return None;
        }
        let (less, k, _) = self.inside.select_nth_unstable(self.r - self.below);
        let k = *k;
        let below = self.below + less.iter().filter(|&&b| b < k).count();
        Some(RankKey { key: k, below })
    }

    /// After a miss: widens the wrong side to the whole key range and resets the counts.
    pub fn widen(&mut self) {
        if self.r < self.below {
            self.t_lo = 0;
        } else {
            self.t_hi = u32::MAX;
        }
        self.below = 0;
        self.inside.clear();
    }
}

/// Branch-free: writes the keys of `values` inside `[t_lo, t_hi]` (in order) to the front of
/// `hits` (at least `values.len()` long) and returns `(keys below t_lo, keys written)`.
pub(crate) fn gather(values: &[f32], t_lo: u32, t_hi: u32, hits: &mut [u32]) -> (usize, usize) {
    let hits = &mut hits[..values.len()];
    let (mut below, mut n) = (0usize, 0usize);
    for &v in values {
        let k = key(v);
        below += (k < t_lo) as usize;
        hits[n] = k;
        n += (k >= t_lo && k <= t_hi) as usize;
    }
    (below, n)
}

/// `(k, number of elements with key < k)` where `k` is the key at ascending rank `r`.
fn key_at_rank(x: &[f32], r: usize) -> (u32, usize) {
    let n = x.len();
    if n < SMALL {
        let mut keys: Vec<u32> = x.iter().map(|&v| key(v)).collect();
        let (below, k, _) = keys.select_nth_unstable(r);
        let k = *k;
        return (k, below.iter().filter(|&&b| b < k).count());
    }
    let mut sample: Vec<u32> = sample_positions(n).into_iter().map(|i| key(x[i])).collect();
    sample.sort_unstable();
    let mut search = RankSearch::new(&sample, n, r);
    loop {
        search.observe(x);
        if let Some(rk) = search.resolve() {
            return (rk.key, rk.below);
        }
        search.widen();
    }
}

/// Zeroes every element of `x` whose magnitude rank is outside `[lo, hi)`.
pub fn keep_rank_window(x: &mut [f32], lo: usize, hi: usize) {
    let n = x.len();
    let hi = hi.min(n);
    if lo >= hi {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    if lo == 0 && hi == n {
        return;
    }
    let (klo, below_lo) = key_at_rank(x, lo);
    // A window reaching the top (TIES' top-k) needs no upper bound: the largest key.
    let (khi, below_hi) = if hi == n { (u32::MAX, n) } else { key_at_rank(x, hi - 1) };
    // Pass 1 (branch-free, vectorizable): keep keys in [klo, khi] (the boundary keys
    // provisionally) and count the boundary keys per chunk.
    let counts: Vec<(usize, usize)> = x
        .par_chunks_mut(CHUNK)
        .map(|c| {
            let (mut a, mut b) = (0, 0);
            for v in c {
                let k = key(*v);
                a += (k == klo) as usize;
                b += (k == khi) as usize;
                *v = if k >= klo && k <= khi { *v } else { 0.0 };
            }
            (a, b)
        })
        .collect();
    let (eq_lo, eq_hi) = counts.iter().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
    // Every boundary element kept is right when the window takes all of them. A zero key
    // needs no care either: keeping or dropping a ±0 leaves the same value.
    let lo_exact = klo == 0 || below_lo == lo;
    let hi_exact = khi == u32::MAX || khi == 0 || below_hi + eq_hi == hi;
    if lo_exact && hi_exact && (klo != khi || klo == 0 || (below_lo == lo && below_lo + eq_lo == hi)) {
        return;
    }
    // Pass 2 (ties at a boundary): ranks among equal keys, in index order, via prefix counts.
    let mut offsets = Vec::with_capacity(counts.len());
    let (mut a, mut b) = (0, 0);
    for (ca, cb) in counts {
        offsets.push((a, b));
        a += ca;
        b += cb;
    }
    x.par_chunks_mut(CHUNK).zip(offsets).for_each(|(c, (mut occ_lo, mut occ_hi))| {
        for v in c {
            let k = key(*v);
            if k != klo && k != khi {
                continue;
            }
            let rank = if k == klo {
                occ_lo += 1;
                if k == khi {
                    occ_hi += 1;
                }
                below_lo + occ_lo - 1
            } else {
                occ_hi += 1;
                below_hi + occ_hi - 1
            };
            if rank < lo || rank >= hi {
                *v = 0.0;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(x: &[f32], lo: usize, hi: usize) -> Vec<f32> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()).then(a.cmp(&b)));
        let mut out = vec![0.0; x.len()];
        for &i in idx.iter().take(hi.min(x.len())).skip(lo) {
            out[i] = x[i];
        }
        out
    }

    proptest! {
        #[test]
        fn matches_a_stable_sort(v in proptest::collection::vec(-4i8..4, 1..300), a in 0usize..320, b in 0usize..320) {
            // small integer values force many ties
            let x: Vec<f32> = v.iter().map(|&i| i as f32 * 0.5).collect();
            let (lo, hi) = (a.min(b), a.max(b));
            let mut got = x.clone();
            keep_rank_window(&mut got, lo, hi);
            prop_assert_eq!(got, reference(&x, lo, hi));
        }

        #[test]
        fn matches_on_continuous_values(x in proptest::collection::vec(-1e3f32..1e3, 1..2000), d in 0.0f64..1.0) {
            let n = x.len();
            let k = ((d * n as f64) as usize).max(1);
            let mut got = x.clone();
            keep_rank_window(&mut got, n - k, n);
            prop_assert_eq!(got, reference(&x, n - k, n));
        }
    }

    #[test]
    fn large_tensor_with_boundary_ties() {
        // values repeat every 1000 elements: every boundary key has ~300 duplicates
        let x: Vec<f32> = (0..300_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) % 1000) as f32) - 500.0).collect();
        for (lo, hi) in [(100_000, 250_000), (0, 123_457), (299_000, 300_000), (5, 6), (0, 1), (299_999, 300_000)] {
            let mut got = x.clone();
            keep_rank_window(&mut got, lo, hi);
            assert_eq!(got, reference(&x, lo, hi), "[{lo}, {hi})");
        }
    }

    #[test]
    fn skewed_large_tensor_hits_the_bracket_fallback_and_stays_exact() {
        // 99% zeros then a ramp: sample-based brackets sit on the zero plateau
        let x: Vec<f32> = (0..400_000u32).map(|i| if i % 100 == 0 { i as f32 } else { 0.0 }).collect();
        for (lo, hi) in [(396_000, 400_000), (395_990, 396_010), (100, 399_999)] {
            let mut got = x.clone();
            keep_rank_window(&mut got, lo, hi);
            assert_eq!(got, reference(&x, lo, hi), "[{lo}, {hi})");
        }
    }

    #[test]
    fn large_tensor_spanning_many_chunks() {
        let x: Vec<f32> = (0..300_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) % 1000) as f32) - 500.0).collect();
        let mut got = x.clone();
        keep_rank_window(&mut got, 100_000, 250_000);
        assert_eq!(got, reference(&x, 100_000, 250_000));
    }
}
