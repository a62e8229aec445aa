//! One lock for libtorch's process-wide random generators.
//!
//! libtorch keeps one default CPU generator (and one per CUDA device) for the whole process, and
//! tch exposes no per-call generator. Three kinds of code draw from it:
//! * [`super::sampler::seeded_noise`] seeds it and draws an item's initial noise, which must equal
//!   PyTorch's `torch.manual_seed(seed); torch.randn(...)`;
//! * random-weight constructors seed it and draw weights (`tiny` preset, benchmarks);
//! * every model build draws the initial values of its variables (`nn::Init`), including builds
//!   that are then overwritten by a checkpoint.
//!
//! A build on one thread between another thread's `manual_seed` and its draw would shift that
//! draw, so all three hold [`lock`] while they seed or draw. The lock is reentrant on one thread,
//! so a random constructor may call a build that takes it again.

use std::cell::Cell;
use std::sync::{Mutex, MutexGuard};

static GLOBAL_GENERATOR: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many [`GeneratorGuard`]s this thread holds (the mutex is held while this is above zero).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Holds the process-wide generators; see the module documentation.
#[must_use = "the generators are held only while the guard lives"]
pub struct GeneratorGuard {
    _held: Option<MutexGuard<'static, ()>>,
}

/// Takes the lock of libtorch's global generators, or nests in this thread's hold of it.
pub fn lock() -> GeneratorGuard {
    let depth = DEPTH.get();
    let held = (depth == 0).then(|| GLOBAL_GENERATOR.lock().unwrap_or_else(|p| p.into_inner()));
    DEPTH.set(depth + 1);
    GeneratorGuard { _held: held }
}

impl Drop for GeneratorGuard {
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
    }
}

/// Seeds the global generators with `seed` and runs `f` while holding them, so that nothing else
/// draws in between.
pub fn seeded<R>(seed: i64, f: impl FnOnce() -> R) -> R {
    let _guard = lock();
    tch::manual_seed(seed);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn nested_holds_on_one_thread_do_not_deadlock_and_release_at_the_end() {
        let outer = lock();
        let inner = lock();
        drop(inner);
        assert!(GLOBAL_GENERATOR.try_lock().is_err(), "the outer guard still holds the mutex");
        drop(outer);
        assert_eq!(DEPTH.get(), 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _g = lock();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(30)).expect("another thread takes the lock after the last guard");
    }

    #[test]
    fn a_draw_on_another_thread_waits_for_the_seeded_section() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let want = seeded(11, || Tensor::randn([64], (Kind::Float, Device::Cpu)));
        // Another thread draws without pause, each draw under the lock; it has drawn once before
        // the seeded section starts. Without the lock its draws would land between the seed and
        // the draw below and shift it.
        let stop = Arc::new(AtomicBool::new(false));
        let (drawing_tx, drawing_rx) = std::sync::mpsc::channel();
        let other = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut draws = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    {
                        let _g = lock();
                        let _ = Tensor::randn([256], (Kind::Float, Device::Cpu));
                    }
                    draws += 1;
                    if draws == 1 {
                        drawing_tx.send(()).unwrap();
                    }
                    // Outside the lock, so that the seeded section gets it.
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                draws
            })
        };
        drawing_rx.recv().unwrap();
        let got = seeded(11, || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            Tensor::randn([64], (Kind::Float, Device::Cpu))
        });
        stop.store(true, Ordering::Relaxed);
        assert!(other.join().unwrap() >= 1);
        assert!(got.equal(&want), "another thread drew between the seed and the draw");
    }
}
