//! Where a training step's time goes, without a profiler.
//!
//! On a GPU the host only queues work, so how long something took is known only after waiting
//! for the device to finish it. A [`measure`]d closure runs with a clock on its thread:
//! - every [`mark`] in the training code waits for the device, then charges the time since the
//!   previous mark to the phase it names (forward, layers backward, optimizer, ...);
//! - in a detailed measurement, every [`within`] waits for the device before and after the work
//!   it wraps and charges that to its category (NF4 dequantization, base GEMMs, LoRA path,
//!   attention core), across all the layers.
//!
//! Outside [`measure`] both only run the code. The waits slow the step they measure (the device
//! idles while the host queues the next kernels), a detailed step much more than a plain one,
//! so `train-bench` times its steps without a clock and measures one more step of each kind.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

/// Seconds spent in one phase or category (summed over its marks or scopes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseTime {
    /// The name given to [`mark`] or [`within`].
    pub phase: &'static str,
    /// Wall seconds, the device's queued work included.
    pub seconds: f64,
}

/// What one [`measure`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Breakdown {
    /// Time between [`mark`]s by phase, in first-marked order, then `"unmarked"` for what ran
    /// after the last mark (when it shows).
    pub phases: Vec<PhaseTime>,
    /// Time inside [`within`] scopes by category (detailed measurements only).
    pub within: Vec<PhaseTime>,
}

struct Clock {
    device: Device,
    detailed: bool,
    /// Inside a [`within`] scope: a nested one is not charged on its own.
    in_scope: bool,
    last: Instant,
    found: Breakdown,
}

thread_local! {
    static CLOCK: RefCell<Option<Clock>> = const { RefCell::new(None) };
}

fn charge(list: &mut Vec<PhaseTime>, phase: &'static str, seconds: f64) {
    match list.iter_mut().find(|p| p.phase == phase) {
        Some(p) => p.seconds += seconds,
        None => list.push(PhaseTime { phase, seconds }),
    }
}

/// Ends the phase `phase`: waits for the device and charges it the time since the previous mark
/// (or the start of [`measure`]). Only runs inside a [`measure`] on this thread.
pub fn mark(phase: &'static str) -> candle_core::Result<()> {
    CLOCK.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(clock) = cell.as_mut() else {
            return Ok(());
        };
        clock.device.synchronize()?;
        let now = Instant::now();
        let seconds = now.duration_since(clock.last).as_secs_f64();
        clock.last = now;
        charge(&mut clock.found.phases, phase, seconds);
        Ok(())
    })
}

/// Runs `f`; inside a detailed [`measure`], also charges its time (the device waited for before
/// and after) to `category`. A scope inside another is charged to the outer one only.
pub fn within<T>(
    category: &'static str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    let device = CLOCK.with(|cell| match cell.borrow_mut().as_mut() {
        Some(clock) if clock.detailed && !clock.in_scope => {
            clock.in_scope = true;
            Some(clock.device.clone())
        }
        _ => None,
    });
    let Some(device) = device else {
        return f();
    };
    let timed = (|| {
        device.synchronize()?;
        let started = Instant::now();
        let value = f()?;
        device.synchronize()?;
        Ok((value, started.elapsed().as_secs_f64()))
    })();
    CLOCK.with(|cell| {
        if let Some(clock) = cell.borrow_mut().as_mut() {
            clock.in_scope = false;
            if let Ok((_, seconds)) = &timed {
                charge(&mut clock.found.within, category, *seconds);
            }
        }
    });
    timed.map(|(value, _)| value)
}

/// Runs `f` with a clock on `device` (`detailed`: the [`within`] scopes are timed too) and
/// returns its result and what the clock found.
pub fn measure<T, E>(
    device: &Device,
    detailed: bool,
    f: impl FnOnce() -> Result<T, E>,
) -> anyhow::Result<(T, Breakdown)>
where
    E: Into<anyhow::Error>,
{
    device.synchronize()?;
    let previous = CLOCK.with(|cell| {
        cell.borrow_mut().replace(Clock {
            device: device.clone(),
            detailed,
            in_scope: false,
            last: Instant::now(),
            found: Breakdown::default(),
        })
    });
    if previous.is_some() {
        CLOCK.with(|cell| *cell.borrow_mut() = previous);
        anyhow::bail!("phases::measure does not nest");
    }
    let result = f();
    let closing = mark("unmarked");
    let clock = CLOCK.with(|cell| cell.borrow_mut().take());
    let value = result.map_err(Into::into)?;
    closing?;
    let mut found = clock.map(|c| c.found).unwrap_or_default();
    // Keep "unmarked" only where something ran after the last mark long enough to show.
    found
        .phases
        .retain(|p| p.phase != "unmarked" || p.seconds > 1e-3);
    Ok((value, found))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sleep_ms(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// The measured closure's wall time: the sum of its phases.
    fn total(found: &Breakdown) -> f64 {
        found.phases.iter().map(|p| p.seconds).sum()
    }

    #[test]
    fn marks_charge_the_time_since_the_previous_mark() {
        let (value, found) = measure(&Device::Cpu, false, || -> anyhow::Result<u32> {
            sleep_ms(30);
            mark("first")?;
            mark("second")?;
            sleep_ms(20);
            mark("first")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        let names: Vec<_> = found.phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["first", "second"]);
        // Both sleeps went to "first"; "second" began right after a mark.
        assert!(found.phases[0].seconds >= 0.050, "{found:?}");
        assert!(found.phases[1].seconds < 0.010, "{found:?}");
        assert!(total(&found) >= 0.050);
    }

    #[test]
    fn scopes_are_timed_only_in_a_detailed_measurement_and_not_twice_when_nested() {
        let step = || -> anyhow::Result<()> {
            within("outer", || {
                sleep_ms(20);
                within("inner", || {
                    sleep_ms(10);
                    Ok(())
                })
            })?;
            within("inner", || {
                sleep_ms(15);
                Ok(())
            })?;
            sleep_ms(5);
            mark("step")?;
            Ok(())
        };
        let ((), plain) = measure(&Device::Cpu, false, step).unwrap();
        assert!(plain.within.is_empty(), "{plain:?}");
        let ((), detailed) = measure(&Device::Cpu, true, step).unwrap();
        let names: Vec<_> = detailed.within.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["outer", "inner"]);
        // The nested scope's 10 ms are in "outer" only; "inner" has its own 15.
        let (outer, inner) = (detailed.within[0].seconds, detailed.within[1].seconds);
        assert!(outer >= 0.030, "{detailed:?}");
        assert!((0.015..0.030).contains(&inner), "{detailed:?}");
        assert!(total(&detailed) >= outer + inner + 0.005, "{detailed:?}");
    }

    #[test]
    fn without_a_clock_marks_and_scopes_only_run_the_code() {
        mark("ignored").unwrap();
        assert_eq!(within("ignored", || Ok(3)).unwrap(), 3);
        let ((), found) = measure(&Device::Cpu, true, || -> anyhow::Result<()> {
            sleep_ms(5);
            Ok(())
        })
        .unwrap();
        assert_eq!(found.phases.len(), 1);
        assert_eq!(found.phases[0].phase, "unmarked");
        assert!(found.phases[0].seconds >= 0.005);
    }

    #[test]
    fn an_error_is_returned_and_the_clock_removed() {
        let err = measure(&Device::Cpu, true, || -> anyhow::Result<()> {
            within("failing", || Err(candle_core::Error::msg("op failed")))?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("op failed"), "{err}");
        let nested = measure(&Device::Cpu, false, || {
            measure(&Device::Cpu, false, || -> anyhow::Result<()> { Ok(()) })
        });
        assert!(
            nested.unwrap_err().to_string().contains("does not nest"),
            "a second clock on the thread is refused"
        );
        // After both, no clock is left on the thread: a new one is not refused as nested.
        measure(&Device::Cpu, false, || -> anyhow::Result<()> { Ok(()) }).unwrap();
    }
}
