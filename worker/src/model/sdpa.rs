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
use std::time::Instant;

use tch::{Kind, Tensor};

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

/// The `--attention-backend` choice: libtorch's default order, one backend tried first, or `Auto`:
/// measured on the machine ([`choose_fastest`]); libtorch's default order until then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preference {
    #[default]
    Default,
    First(Backend),
    Auto,
}

impl Preference {
    /// The full order this preference sets.
    pub fn order(self) -> Vec<Backend> {
        match self {
            Preference::Default | Preference::Auto => DEFAULT_ORDER.to_vec(),
            Preference::First(b) => std::iter::once(b).chain(DEFAULT_ORDER.into_iter().filter(|x| *x != b)).collect(),
        }
    }
}

impl FromStr for Preference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "default" => Preference::Default,
            "auto" => Preference::Auto,
            "cudnn" => Preference::First(Backend::Cudnn),
            "flash" => Preference::First(Backend::Flash),
            "efficient" => Preference::First(Backend::Efficient),
            "math" => Preference::First(Backend::Math),
            _ => return Err(format!("unknown attention backend {s:?} (auto, default, cudnn, flash, efficient, math)")),
        })
    }
}

impl fmt::Display for Preference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preference::Default => "default",
            Preference::Auto => "auto",
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
    set_order(&pref.order())
}

/// Sets libtorch's order; it must name every backend exactly once.
pub fn set_order(order: &[Backend]) -> Result<(), String> {
    let codes: Vec<i64> = order.iter().map(|&b| b as i64).collect();
    // SAFETY: the pointer and length describe `codes`, which outlives the call; the function copies them.
    let rc = unsafe { farm_sdpa_set_priority(codes.as_ptr(), codes.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("not an attention backend order (every backend exactly once): {order:?}"))
    }
}

/// libtorch's current order.
pub fn priority_order() -> Vec<Backend> {
    let mut buf = [0i64; 8];
    // SAFETY: `buf` has room for `buf.len()` codes and the function writes at most that many.
    let n = unsafe { farm_sdpa_priority(buf.as_mut_ptr(), buf.len()) };
    buf[..n.min(buf.len())].iter().filter_map(|&c| Backend::from_code(c)).collect()
}

/// One candidate's result in [`choose_fastest`].
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub preference: Preference,
    /// Median seconds per call; `None` when the call failed.
    pub median_s: Option<f64>,
    /// Largest difference from the first candidate's output, relative to its largest magnitude.
    pub deviation: f64,
    /// Fast enough to count: it ran and agreed with the first candidate within the tolerance.
    pub agrees: bool,
}

/// Runs `call` under each candidate order (`rounds` timed calls each after one untimed one, the
/// candidates taking turns so that all see the same machine state), and leaves libtorch set to the
/// fastest candidate whose output agrees with the first candidate's within `tolerance` (relative to
/// its largest magnitude). The first candidate is the reference and the fallback (libtorch's
/// default order if the reference itself fails): a candidate that fails (an error or a panic inside
/// libtorch) or disagrees is never chosen. `call` must include
/// whatever synchronisation makes its wall time the device time.
pub fn choose_fastest(
    candidates: &[Preference],
    rounds: usize,
    tolerance: f64,
    mut call: impl FnMut() -> Result<Tensor, String>,
) -> Result<(Preference, Vec<Trial>), String> {
    let first = *candidates.first().ok_or("no candidate attention backends")?;
    let mut run = |p: Preference| -> Option<(Tensor, f64)> {
        prefer(p).ok()?;
        let start = Instant::now();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut call)).ok()?.ok()?;
        Some((out, start.elapsed().as_secs_f64()))
    };
    let mut outputs: Vec<Option<Tensor>> = candidates.iter().map(|&p| run(p).map(|(o, _)| o)).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); candidates.len()];
    for _ in 0..rounds.max(1) {
        for (i, &p) in candidates.iter().enumerate() {
            if outputs[i].is_none() {
                continue;
            }
            match run(p) {
                Some((_, t)) => times[i].push(t),
                None => outputs[i] = None,
            }
        }
    }
    let reference = outputs[0].take().map(|o| o.to_kind(Kind::Double));
    let scale = reference.as_ref().map_or(1.0, |r| r.abs().max().double_value(&[]).max(f64::MIN_POSITIVE));
    let mut trials = Vec::with_capacity(candidates.len());
    for (i, &p) in candidates.iter().enumerate() {
        let median_s = (!times[i].is_empty()).then(|| {
            let mut t = times[i].clone();
            t.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
            t[t.len() / 2]
        });
        let deviation = match (i, &reference, outputs[i].take()) {
            (0, Some(_), _) => 0.0,
            (_, Some(r), Some(o)) => (o.to_kind(Kind::Double) - r).abs().max().double_value(&[]) / scale,
            _ => f64::INFINITY,
        };
        let agrees = median_s.is_some() && deviation.is_finite() && deviation <= tolerance;
        trials.push(Trial { preference: p, median_s, deviation, agrees });
    }
    let chosen = trials
        .iter()
        .filter(|t| t.agrees)
        .min_by(|a, b| a.median_s.partial_cmp(&b.median_s).expect("finite times"))
        .map_or(if reference.is_some() { first } else { Preference::Default }, |t| t.preference);
    prefer(chosen)?;
    Ok((chosen, trials))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferences_parse_and_print() {
        for s in ["auto", "default", "cudnn", "flash", "efficient", "math"] {
            assert_eq!(s.parse::<Preference>().unwrap().to_string(), s);
        }
        assert!("fa3".parse::<Preference>().unwrap_err().contains("cudnn"));
    }

    /// A stand-in for a forward pass: its speed and output depend on the backend tried first.
    fn fake_call(fast: Backend, wrong: Option<Backend>, fails: Option<Backend>) -> impl FnMut() -> Result<Tensor, String> {
        move || {
            let first = priority_order()[0];
            if Some(first) == fails {
                panic!("kernel error");
            }
            std::thread::sleep(std::time::Duration::from_millis(if first == fast { 2 } else { 20 }));
            let out = Tensor::from_slice(&[1.0f32, -2.0, 4.0]);
            Ok(if Some(first) == wrong { out * 1.5 } else { out })
        }
    }

    #[test]
    fn choose_fastest_picks_the_fastest_agreeing_backend_and_falls_back_to_the_first() {
        let _order = OrderGuard::take();
        let cudnn = Preference::First(Backend::Cudnn);
        let math = Preference::First(Backend::Math);
        let both = [Preference::Default, cudnn, math];
        // cuDNN first is the fast one and right: it is chosen and set.
        let (chosen, trials) = choose_fastest(&both, 3, 1e-3, fake_call(Backend::Cudnn, None, None)).unwrap();
        assert_eq!(chosen, cudnn);
        assert_eq!(priority_order()[0], Backend::Cudnn);
        assert!(trials.iter().all(|t| t.agrees && t.median_s.is_some()), "{trials:?}");
        // Fast but wrong is never chosen; failing is never chosen.
        let (chosen, trials) =
            choose_fastest(&both, 3, 1e-3, fake_call(Backend::Cudnn, Some(Backend::Cudnn), Some(Backend::Math))).unwrap();
        assert_eq!(chosen, Preference::Default, "{trials:?}");
        assert!((trials[1].deviation - 0.5).abs() < 1e-9, "output off by half its magnitude: {trials:?}");
        assert!(!trials[1].agrees && !trials[2].agrees && trials[2].median_s.is_none(), "{trials:?}");
        assert_eq!(priority_order(), DEFAULT_ORDER.to_vec());
        // The reference itself failing leaves the default order.
        let (chosen, _) =
            choose_fastest(&[cudnn, Preference::Default], 2, 1e-3, fake_call(Backend::Flash, None, Some(Backend::Cudnn))).unwrap();
        assert_eq!(chosen, Preference::Default, "nothing to compare with: libtorch's default order");
        prefer(Preference::Default).unwrap();
    }

    /// These tests change libtorch's process-wide order.
    static ORDER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Holds the order lock and puts libtorch's default order back when the test ends, also when it fails.
    struct OrderGuard(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

    impl OrderGuard {
        fn take() -> Self {
            let g = OrderGuard(ORDER_LOCK.lock().unwrap_or_else(|p| p.into_inner()));
            prefer(Preference::Default).unwrap();
            g
        }
    }

    impl Drop for OrderGuard {
        fn drop(&mut self) {
            let _ = prefer(Preference::Default);
        }
    }

    #[test]
    fn malformed_orders_are_refused_and_change_nothing() {
        let _order = OrderGuard::take();
        prefer(Preference::First(Backend::Cudnn)).unwrap();
        let before = priority_order();
        for bad in [
            vec![Backend::Cudnn, Backend::Flash],
            vec![Backend::Cudnn, Backend::Cudnn, Backend::Flash, Backend::Efficient, Backend::Math],
            vec![Backend::Math, Backend::Flash, Backend::Efficient, Backend::Cudnn, Backend::Overrideable, Backend::Math],
        ] {
            assert!(set_order(&bad).unwrap_err().contains("exactly once"), "{bad:?} accepted");
            assert_eq!(priority_order(), before, "a refused order changed libtorch's");
        }
    }

    #[test]
    fn the_order_reaches_libtorch_and_back() {
        let _order = OrderGuard::take();
        prefer(Preference::Default).unwrap();
        assert_eq!(priority_order(), DEFAULT_ORDER.to_vec());
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
