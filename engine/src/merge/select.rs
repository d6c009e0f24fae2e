//! Rank selection without sorting: which elements of a tensor have a rank (by magnitude) in a
//! window `[lo, hi)`.
//!
//! Ranks are positions in ascending `(|x|, index)` order, i.e. a stable sort by magnitude. The
//! `k`-th value is found by a radix select on the IEEE-754 bits of `|x|` (for non-negative
//! floats the bit pattern orders like the value): a 65,536-bin histogram of the high 16 bits
//! finds the bucket holding rank `k`, then the keys of that one bucket are gathered and
//! `select_nth_unstable` finds the exact value. Both passes are parallel; the selection is O(n)
//! where mergekit sorts the whole tensor (O(n log n)). Small tensors skip the histogram.

use rayon::prelude::*;

const CHUNK: usize = 1 << 16;

fn key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// Below this many elements a sort-free sequential `select_nth_unstable` beats histograms.
const SMALL: usize = 1 << 17;

/// `(k, number of elements with key < k)` where `k` is the key at ascending rank `r`.
fn key_at_rank(x: &[f32], r: usize) -> (u32, usize) {
    if x.len() < SMALL {
        let mut keys: Vec<u32> = x.iter().map(|&v| key(v)).collect();
        let (below, k, _) = keys.select_nth_unstable(r);
        let k = *k;
        return (k, below.iter().filter(|&&b| b < k).count());
    }
    // One histogram per worker block (not per rayon split) keeps allocations to a handful.
    let block = x.len().div_ceil(rayon::current_num_threads().max(1)).max(CHUNK);
    let hist = || -> Vec<usize> {
        x.par_chunks(block)
            .map(|c| {
                let mut h = vec![0u32; 1 << 16];
                for &v in c {
                    h[(key(v) >> 16) as usize] += 1;
                }
                h
            })
            .fold(
                || vec![0usize; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y as usize);
                    a
                },
            )
            .reduce_with(|mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![0usize; 1 << 16])
    };
    let find = |h: &[usize], mut r: usize| -> (usize, usize) {
        let mut below = 0;
        for (b, &c) in h.iter().enumerate() {
            if r < c {
                return (b, below);
            }
            r -= c;
            below += c;
        }
        (h.len() - 1, below)
    };
    let (hi, below_hi) = find(&hist(), r);
    // Second level: gather the keys of the one bucket that holds rank r and select among them.
    let hi = hi as u32;
    let mut bucket: Vec<u32> = x
        .par_chunks(CHUNK)
        .flat_map_iter(|c| c.iter().map(|&v| key(v)).filter(move |k| k >> 16 == hi))
        .collect();
    let (below, k, _) = bucket.select_nth_unstable(r - below_hi);
    let k = *k;
    (k, below_hi + below.iter().filter(|&&b| b < k).count())
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
    // Occurrence numbers of the boundary keys, in index order, via per-chunk prefix counts.
    let counts: Vec<(usize, usize)> = x
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter().fold((0, 0), |(a, b), &v| {
                let k = key(v);
                (a + (k == klo) as usize, b + (k == khi) as usize)
            })
        })
        .collect();
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
            let keep = if k == klo || k == khi {
                // rank of this element among equal keys
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
                rank >= lo && rank < hi
            } else {
                k > klo && k < khi
            };
            if !keep {
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
    fn large_tensor_spanning_many_chunks() {
        let x: Vec<f32> = (0..300_000u32).map(|i| ((i.wrapping_mul(2_654_435_761) % 1000) as f32) - 500.0).collect();
        let mut got = x.clone();
        keep_rank_window(&mut got, 100_000, 250_000);
        assert_eq!(got, reference(&x, 100_000, 250_000));
    }
}
