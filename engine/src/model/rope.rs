//! Rotary position embeddings: inverse frequencies (default, `linear`, `llama3`) and cos/sin
//! tables, computed in `f32` exactly as transformers does (`inv_freq = 1 / base^(2i/d)` in f32,
//! angle = position · inv_freq as one f32 product), so long positions agree too.

use crate::io::config::RopeScaling;

/// Inverse frequencies, one per rotated pair (`head_dim / 2`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
}

impl Rope {
    /// transformers' `_compute_default_rope_parameters`, then the configured scaling
    /// (`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`).
    pub fn new(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32)).collect();
        match scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for f in &mut inv_freq {
                    *f /= *factor as f32;
                }
            }
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let (factor, low, high) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32);
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    // transformers: ~(wavelen < high) & ~(wavelen > low) (frequencies are finite)
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    /// `(cos, sin)` for each position, row-major `[positions.len(), head_dim / 2]`.
    pub fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let h = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * h);
        let mut sin = Vec::with_capacity(positions.len() * h);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies() {
        let r = Rope::new(8, 10000.0, None);
        let want = [1.0, 0.1, 0.01, 0.001];
        for (g, w) in r.inv_freq.iter().zip(want) {
            assert!((g - w).abs() <= 1e-6 * w, "{g} vs {w}");
        }
        let (c, s) = r.tables(&[0, 2]);
        assert_eq!(&c[..4], &[1.0; 4]);
        assert_eq!(&s[..4], &[0.0; 4]);
        assert!((c[4] - 2f32.cos()).abs() < 1e-7 && (s[5] - 0.2f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn linear_and_llama3_scaling() {
        let lin = Rope::new(8, 10000.0, Some(&RopeScaling::Linear { factor: 4.0 }));
        assert!((lin.inv_freq[1] - 0.025).abs() < 1e-8);
        // Llama 3.1 values: high frequencies untouched, the lowest divided by the factor.
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192 };
        let plain = Rope::new(128, 500000.0, None);
        let l3 = Rope::new(128, 500000.0, Some(&s));
        assert_eq!(l3.inv_freq[0], plain.inv_freq[0]);
        assert!((l3.inv_freq[63] - plain.inv_freq[63] / 8.0).abs() < 1e-12);
        // In between: strictly between the two.
        let mid = (0..64).find(|&i| l3.inv_freq[i] != plain.inv_freq[i] && l3.inv_freq[i] != plain.inv_freq[i] / 8.0);
        assert!(mid.is_some());
    }
}
