//! Standard analytic test functions (minimum 0 at the origin unless noted), for tests and
//! benchmarks of the optimizers.

/// Σ xᵢ².
pub fn sphere(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum()
}

/// Σ 10^(6·i/(n−1)) xᵢ² (condition number 1e6).
pub fn ellipsoid(x: &[f64]) -> f64 {
    let n = x.len();
    x.iter().enumerate().map(|(i, v)| 10f64.powf(6.0 * i as f64 / (n.max(2) - 1) as f64) * v * v).sum()
}

/// Σ 100(xᵢ₊₁ − xᵢ²)² + (1 − xᵢ)²; minimum 0 at (1, …, 1).
pub fn rosenbrock(x: &[f64]) -> f64 {
    x.windows(2).map(|w| 100.0 * (w[1] - w[0] * w[0]).powi(2) + (1.0 - w[0]).powi(2)).sum()
}

/// 10n + Σ xᵢ² − 10 cos(2π xᵢ).
pub fn rastrigin(x: &[f64]) -> f64 {
    10.0 * x.len() as f64 + x.iter().map(|v| v * v - 10.0 * (2.0 * std::f64::consts::PI * v).cos()).sum::<f64>()
}

/// ZDT1 (genes in [0, 1]): f₁ = x₁, g = 1 + 9 Σᵢ₌₂ xᵢ/(n − 1), f₂ = g (1 − √(f₁/g)).
pub fn zdt1(x: &[f64]) -> Vec<f64> {
    let g = zdt_g(x);
    vec![x[0], g * (1.0 - (x[0] / g).sqrt())]
}

/// ZDT2: f₂ = g (1 − (f₁/g)²) (concave front).
pub fn zdt2(x: &[f64]) -> Vec<f64> {
    let g = zdt_g(x);
    vec![x[0], g * (1.0 - (x[0] / g).powi(2))]
}

/// ZDT3: f₂ = g (1 − √(f₁/g) − (f₁/g) sin(10π f₁)) (disconnected front).
pub fn zdt3(x: &[f64]) -> Vec<f64> {
    let g = zdt_g(x);
    let h = 1.0 - (x[0] / g).sqrt() - (x[0] / g) * (10.0 * std::f64::consts::PI * x[0]).sin();
    vec![x[0], g * h]
}

fn zdt_g(x: &[f64]) -> f64 {
    1.0 + 9.0 * x[1..].iter().sum::<f64>() / (x.len() - 1) as f64
}

/// DTLZ2 with 3 objectives (genes in [0, 1]); the front is the unit sphere's positive octant.
pub fn dtlz2(x: &[f64]) -> Vec<f64> {
    let g: f64 = x[2..].iter().map(|v| (v - 0.5).powi(2)).sum();
    let h = std::f64::consts::FRAC_PI_2;
    vec![(1.0 + g) * (x[0] * h).cos() * (x[1] * h).cos(), (1.0 + g) * (x[0] * h).cos() * (x[1] * h).sin(), (1.0 + g) * (x[0] * h).sin()]
}

/// The mixed binary–continuous functions of Hamano et al. (GECCO 2022): the first half of the
/// genes continuous, the second half binary genes, on iff > 0 (the [`crate::GeneKind::Binary`]
/// convention). Minimum 0: continuous genes 0, every bit on.
///
/// SphereOneMax: Σ xᵢ² over the continuous half + the number of bits off.
pub fn sphere_onemax(x: &[f64]) -> f64 {
    let (co, bi) = x.split_at(x.len() / 2);
    sphere(co) + bi.iter().filter(|b| **b <= 0.0).count() as f64
}

/// EllipsoidLeadingOnes: the ellipsoid (condition 1e6) over the continuous half + the number of
/// bits after the leading run of ones.
pub fn ellipsoid_leadingones(x: &[f64]) -> f64 {
    let (co, bi) = x.split_at(x.len() / 2);
    ellipsoid(co) + (bi.len() - bi.iter().take_while(|b| **b > 0.0).count()) as f64
}
