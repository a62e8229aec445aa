//! Render parameters as stored: a task's complete `RenderParams` as canonical JSON (its "shape").
//!
//! Tasks with byte-equal shapes can share a GPU batch; the shape is parsed back into `RenderParams`
//! when a task is assigned.

use farm_proto::pb::RenderParams;
use serde_json::{json, Value};

/// Canonical JSON of the parameters: keys sorted, so equal parameters give equal strings.
pub fn shape_of(p: &RenderParams) -> String {
    let v = json!({
        "width": p.width,
        "height": p.height,
        "steps": p.steps,
        "cfg_scale": p.cfg_scale,
        "cfg_trunc": p.cfg_trunc,
        "renorm_cfg": p.renorm_cfg,
        "shift": p.shift,
        "sampler": p.sampler,
        "precision": p.precision,
        "model": p.model,
    });
    v.to_string()
}

/// Parses a shape back; unknown or missing fields fall back to zero values.
pub fn params_of(shape: &str) -> RenderParams {
    let v: Value = serde_json::from_str(shape).unwrap_or(Value::Null);
    let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    let opt_f = |k: &str| v.get(k).and_then(Value::as_f64).map(|x| x as f32);
    let f = |k: &str| opt_f(k).unwrap_or(0.0);
    let i = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or(0) as i32;
    RenderParams {
        width: u("width"),
        height: u("height"),
        steps: u("steps"),
        cfg_scale: opt_f("cfg_scale"),
        cfg_trunc: opt_f("cfg_trunc"),
        renorm_cfg: f("renorm_cfg"),
        shift: f("shift"),
        sampler: i("sampler"),
        precision: i("precision"),
        model: v.get("model").and_then(Value::as_str).unwrap_or_default().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farm_proto::limits::with_defaults;

    #[test]
    fn shape_round_trips_and_is_canonical() {
        let p = with_defaults(&RenderParams { width: 512, cfg_scale: Some(4.5), ..Default::default() });
        let s = shape_of(&p);
        assert_eq!(params_of(&s), p);
        assert_eq!(s, shape_of(&p.clone()));
        let q = RenderParams { steps: 29, ..p.clone() };
        assert_ne!(shape_of(&q), s);
        // sorted keys
        assert!(s.find("\"cfg_scale\"").unwrap() < s.find("\"width\"").unwrap());
    }
}
