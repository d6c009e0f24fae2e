//! Pareto utilities (minimization): dominance, fast non-dominated sort and crowding distance
//! (Deb et al. 2002), and exact hypervolume.

#![allow(clippy::needless_range_loop)] // objective-wise loops index several points

/// `a` dominates `b`: no worse in every objective, better in one.
pub fn dominates(a: &[f64], b: &[f64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x <= y) && a.iter().zip(b).any(|(x, y)| x < y)
}

/// Fast non-dominated sort: the rank (0 = Pareto front) of every point.
pub fn nondominated_ranks(points: &[Vec<f64>]) -> Vec<usize> {
    let n = points.len();
    let mut dominated_by = vec![0usize; n];
    let mut dominates_list: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        for j in i + 1..n {
            if dominates(&points[i], &points[j]) {
                dominates_list[i].push(j);
                dominated_by[j] += 1;
            } else if dominates(&points[j], &points[i]) {
                dominates_list[j].push(i);
                dominated_by[i] += 1;
            }
        }
    }
    let mut rank = vec![0usize; n];
    let mut front: Vec<usize> = (0..n).filter(|&i| dominated_by[i] == 0).collect();
    let mut r = 0;
    while !front.is_empty() {
        let mut next = Vec::new();
        for &i in &front {
            rank[i] = r;
            for &j in &dominates_list[i] {
                dominated_by[j] -= 1;
                if dominated_by[j] == 0 {
                    next.push(j);
                }
            }
        }
        front = next;
        r += 1;
    }
    rank
}

/// Crowding distance of each point within one front (boundary points: +∞).
pub fn crowding_distance(points: &[&[f64]]) -> Vec<f64> {
    let n = points.len();
    let mut d = vec![0.0; n];
    if n == 0 {
        return d;
    }
    for m in 0..points[0].len() {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| points[a][m].total_cmp(&points[b][m]).then(a.cmp(&b)));
        let (lo, hi) = (points[idx[0]][m], points[idx[n - 1]][m]);
        d[idx[0]] = f64::INFINITY;
        d[idx[n - 1]] = f64::INFINITY;
        if hi > lo {
            for k in 1..n - 1 {
                d[idx[k]] += (points[idx[k + 1]][m] - points[idx[k - 1]][m]) / (hi - lo);
            }
        }
    }
    d
}

/// Exact hypervolume dominated by `points` and bounded by `reference` (minimization). Points not
/// strictly better than the reference in every objective contribute nothing. Two objectives: a
/// sweep (O(n log n)); more: slicing along the last objective (HSO), exact, for the modest
/// front sizes of a merge search.
pub fn hypervolume(points: &[Vec<f64>], reference: &[f64]) -> f64 {
    let pts: Vec<Vec<f64>> = points.iter().filter(|p| p.iter().zip(reference).all(|(x, r)| x < r)).cloned().collect();
    hv(pts, reference)
}

fn hv(mut pts: Vec<Vec<f64>>, r: &[f64]) -> f64 {
    let d = r.len();
    if pts.is_empty() {
        return 0.0;
    }
    if d == 1 {
        return r[0] - pts.iter().map(|p| p[0]).fold(f64::INFINITY, f64::min);
    }
    if d == 2 {
        pts.sort_by(|a, b| a[0].total_cmp(&b[0]).then(a[1].total_cmp(&b[1])));
        let (mut area, mut best_y) = (0.0, r[1]);
        for p in &pts {
            if p[1] < best_y {
                area += (r[0] - p[0]) * (best_y - p[1]);
                best_y = p[1];
            }
        }
        return area;
    }
    pts.sort_by(|a, b| a[d - 1].total_cmp(&b[d - 1]));
    let mut total = 0.0;
    for i in 0..pts.len() {
        let upper = if i + 1 < pts.len() { pts[i + 1][d - 1] } else { r[d - 1] };
        let height = upper - pts[i][d - 1];
        if height > 0.0 {
            let slice: Vec<Vec<f64>> = pts[..=i].iter().map(|p| p[..d - 1].to_vec()).collect();
            total += height * hv(slice, &r[..d - 1]);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranks_match_brute_force(pts in proptest::collection::vec(proptest::collection::vec(0u8..6, 3), 1..40)) {
            let pts: Vec<Vec<f64>> = pts.iter().map(|p| p.iter().map(|&x| x as f64).collect()).collect();
            let ranks = nondominated_ranks(&pts);
            // brute force: peel fronts
            let mut left: Vec<usize> = (0..pts.len()).collect();
            let mut r = 0;
            while !left.is_empty() {
                let front: Vec<usize> = left.iter().copied().filter(|&i| !left.iter().any(|&j| dominates(&pts[j], &pts[i]))).collect();
                for &i in &front {
                    prop_assert_eq!(ranks[i], r);
                }
                left.retain(|i| !front.contains(i));
                r += 1;
            }
        }

        #[test]
        fn crowding_matches_definition(pts in proptest::collection::vec(proptest::collection::vec(0.0f64..1.0, 2), 3..20)) {
            let refs: Vec<&[f64]> = pts.iter().map(Vec::as_slice).collect();
            let d = crowding_distance(&refs);
            for m in 0..2 {
                let (lo, hi) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p[m]), b.max(p[m])));
                let argmin = (0..pts.len()).min_by(|&a, &b| pts[a][m].total_cmp(&pts[b][m]).then(a.cmp(&b))).unwrap_or(0);
                prop_assert!(d[argmin].is_infinite());
                prop_assert!(hi >= lo);
            }
            prop_assert!(d.iter().all(|x| *x >= 0.0));
        }

        #[test]
        fn hypervolume_agrees_with_monte_carlo(pts in proptest::collection::vec(proptest::collection::vec(0.0f64..1.0, 3), 1..8), seed in 0u64..1000) {
            let r = [1.0, 1.0, 1.0];
            let exact = hypervolume(&pts, &r);
            let mut rng = Rng::seeded(seed);
            let n = 20_000;
            let hits = (0..n).filter(|_| {
                let q = [rng.uniform(), rng.uniform(), rng.uniform()];
                pts.iter().any(|p| p.iter().zip(&q).all(|(a, b)| a <= b))
            }).count();
            let mc = hits as f64 / n as f64;
            // binomial standard error ≤ 0.0036; 5σ
            prop_assert!((exact - mc).abs() < 0.018, "exact {} mc {}", exact, mc);
        }
    }

    #[test]
    fn two_d_hypervolume_by_hand() {
        let pts = vec![vec![0.0, 1.0], vec![0.5, 0.5], vec![1.0, 0.0], vec![0.6, 0.6]];
        // staircase under (2, 2): 2·1 + 1.5·0.5 + 1·0.5 = 3.25
        assert!((hypervolume(&pts, &[2.0, 2.0]) - 3.25).abs() < 1e-12);
        assert_eq!(hypervolume(&[vec![3.0, 0.0]], &[2.0, 2.0]), 0.0);
    }
}
