//! [`DeviceSpec`]: where a model runs, as the user writes it (`cpu`, `cuda`, `cuda:1`).

use std::fmt;
use std::str::FromStr;

use crate::error::EngineError;

/// A compute device. Backends are cargo features: a CUDA device in a build without the `cuda`
/// feature is a clear error when a model is opened, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The host CPU (burn-ndarray, f32).
    #[default]
    Cpu,
    /// NVIDIA GPU `index` (burn-cuda).
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this binary can run on the device.
    pub fn is_compiled_in(&self) -> bool {
        match self {
            DeviceSpec::Cpu => true,
            DeviceSpec::Cuda(_) => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EngineError::Device { device: s.to_string(), reason: "expected 'cpu', 'cuda' or 'cuda:N'".into() };
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            t => match t.strip_prefix("cuda:") {
                Some(i) => i.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = EngineError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, d) in [("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(0)), ("cuda:3", DeviceSpec::Cuda(3))] {
            assert_eq!(s.parse::<DeviceSpec>().expect(s), d);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        for bad in ["tpu", "cuda:x", "cuda:", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }
}
