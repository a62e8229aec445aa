//! Which fused kernel `scaled_dot_product_attention` uses on CUDA, and how the DiT feeds it.
//!
//! libtorch tries its CUDA attention backends in a global priority order and runs the first whose
//! constraints the inputs meet (dtype, head size, mask, GPU generation). Its default order is
//! flash, memory-efficient, math, cuDNN, so the cuDNN kernel (the fastest on Hopper for many shapes)
//! is never chosen unless it is moved ahead of math. [`prefer`] puts one backend first and keeps the
//! default order for the rest, so inputs that backend cannot take still run. The CPU path ignores
//! the order (it has one fused kernel and the math fallback).
//!
//! The order lives in libtorch's global context: it applies to every thread of the process.

use std::fmt;
use std::str::FromStr;

extern "C" {
    fn farm_sdpa_set_priority(order: *const i64, n: usize) -> i32;
    fn farm_sdpa_priority(out: *mut i64, cap: usize) -> usize;
}

/// libtorch's attention backends (`at::SDPBackend`, same codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Math = 0,
    Flash = 1,
    Efficient = 2,
    Cudnn = 3,
    Overrideable = 4,
}

impl Backend {
    fn from_code(c: i64) -> Option<Self> {
        Some(match c {
            0 => Self::Math,
            1 => Self::Flash,
            2 => Self::Efficient,
            3 => Self::Cudnn,
            4 => Self::Overrideable,
            _ => return None,
        })
    }
}

/// libtorch's default order.
pub const DEFAULT_ORDER: [Backend; 5] =
    [Backend::Flash, Backend::Efficient, Backend::Math, Backend::Cudnn, Backend::Overrideable];

/// The `--attention-backend` choice: libtorch's default order, or one backend tried first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    #[default]
    Default,
    First(Backend),
}

impl Preference {
    /// The full order this preference sets.
    pub fn order(self) -> Vec<Backend> {
        match self {
            Preference::Default => DEFAULT_ORDER.to_vec(),
            Preference::First(b) => std::iter::once(b).chain(DEFAULT_ORDER.into_iter().filter(|x| *x != b)).collect(),
        }
    }
}

impl FromStr for Preference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "default" | "auto" => Preference::Default,
            "cudnn" => Preference::First(Backend::Cudnn),
            "flash" => Preference::First(Backend::Flash),
            "efficient" => Preference::First(Backend::Efficient),
            "math" => Preference::First(Backend::Math),
            _ => return Err(format!("unknown attention backend {s:?} (default, cudnn, flash, efficient, math)")),
        })
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preference::Default => "default",
            Preference::First(Backend::Cudnn) => "cudnn",
            Preference::First(Backend::Flash) => "flash",
            Preference::First(Backend::Efficient) => "efficient",
            Preference::First(Backend::Math) => "math",
            Preference::First(Backend::Overrideable) => "overrideable",
        })
    }
}

/// Sets libtorch's order for `pref`.
pub fn prefer(pref: Preference) -> Result<(), String> {
    let codes: Vec<i64> = pref.order().into_iter().map(|b| b as i64).collect();
    // SAFETY: the pointer and length describe `codes`, which outlives the call; the function copies them.
    let rc = unsafe { farm_sdpa_set_priority(codes.as_ptr(), codes.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("libtorch refused the attention backend order {:?}", pref.order()))
    }
}

/// libtorch's current order.
pub fn priority_order() -> Vec<Backend> {
    let mut buf = [0i64; 8];
    // SAFETY: `buf` has room for `buf.len()` codes and the function writes at most that many.
    let n = unsafe { farm_sdpa_priority(buf.as_mut_ptr(), buf.len()) };
    buf[..n.min(buf.len())].iter().filter_map(|&c| Backend::from_code(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_parse_and_print() {
        for s in ["default", "cudnn", "flash", "efficient", "math"] {
            assert_eq!(s.parse::<Preference>().unwrap().to_string(), s);
        }
        assert!("fa3".parse::<Preference>().unwrap_err().contains("cudnn"));
    }

    #[test]
    fn the_order_reaches_libtorch_and_back() {
        // The one test in this binary that touches the global order; it restores the default.
        assert_eq!(priority_order(), DEFAULT_ORDER.to_vec(), "libtorch's default order changed");
        prefer(Preference::First(Backend::Cudnn)).unwrap();
        assert_eq!(
            priority_order(),
            vec![Backend::Cudnn, Backend::Flash, Backend::Efficient, Backend::Math, Backend::Overrideable]
        );
        prefer(Preference::First(Backend::Math)).unwrap();
        assert_eq!(priority_order()[0], Backend::Math);
        prefer(Preference::Default).unwrap();
        assert_eq!(priority_order(), DEFAULT_ORDER.to_vec());
    }
}
