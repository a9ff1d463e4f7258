//! Where a training step's time goes, phase by phase.
//!
//! On a GPU the host only queues work, so how long a phase took is known only after waiting for
//! the device to finish it. A [`measure`]d closure runs with a clock on its thread: every
//! [`mark`] in the training code waits for the device, then charges the time since the previous
//! mark to the phase it names. Outside [`measure`] a mark does nothing. The waits slow the step
//! they measure (the device idles while the host queues the next phase's first kernels), so
//! `train-bench` times its steps without a clock and measures one more step for the breakdown.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

/// Seconds one phase took (summed over its marks in the measured closure).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseTime {
    /// The name given to [`mark`].
    pub phase: &'static str,
    /// Wall seconds, the device's queued work included.
    pub seconds: f64,
}

struct Clock {
    device: Device,
    last: Instant,
    spent: Vec<PhaseTime>,
}

thread_local! {
    static CLOCK: RefCell<Option<Clock>> = const { RefCell::new(None) };
}

/// Ends the phase `phase`: waits for `device` and charges it the time since the previous mark
/// (or the start of [`measure`]). A no-op unless a [`measure`] is running on this thread.
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
        match clock.spent.iter_mut().find(|p| p.phase == phase) {
            Some(p) => p.seconds += seconds,
            None => clock.spent.push(PhaseTime { phase, seconds }),
        }
        Ok(())
    })
}

/// Runs `f` with a clock on `device`: returns its result and the time of each phase it marked,
/// in first-marked order, then `"unmarked"` for whatever ran after the last mark.
pub fn measure<T, E>(
    device: &Device,
    f: impl FnOnce() -> Result<T, E>,
) -> anyhow::Result<(T, Vec<PhaseTime>)>
where
    E: Into<anyhow::Error>,
{
    device.synchronize()?;
    let previous = CLOCK.with(|cell| {
        cell.borrow_mut().replace(Clock {
            device: device.clone(),
            last: Instant::now(),
            spent: Vec::new(),
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
    let mut spent = clock.map(|c| c.spent).unwrap_or_default();
    // Keep "unmarked" only where something ran after the last mark long enough to show.
    spent.retain(|p| p.phase != "unmarked" || p.seconds > 1e-3);
    Ok((value, spent))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn marks_charge_the_time_since_the_previous_mark() {
        let (value, spent) = measure(&Device::Cpu, || -> anyhow::Result<u32> {
            std::thread::sleep(Duration::from_millis(30));
            mark("first")?;
            mark("second")?;
            std::thread::sleep(Duration::from_millis(20));
            mark("first")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        let names: Vec<_> = spent.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["first", "second"]);
        // Both sleeps went to "first"; "second" began right after a mark.
        assert!(spent[0].seconds >= 0.050, "{spent:?}");
        assert!(spent[1].seconds < 0.010, "{spent:?}");
    }

    #[test]
    fn without_a_clock_a_mark_does_nothing_and_the_tail_is_unmarked() {
        mark("ignored").unwrap();
        let ((), spent) = measure(&Device::Cpu, || -> anyhow::Result<()> {
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        })
        .unwrap();
        assert_eq!(spent.len(), 1);
        assert_eq!(spent[0].phase, "unmarked");
        assert!(spent[0].seconds >= 0.005);
    }

    #[test]
    fn an_error_is_returned_and_the_clock_removed() {
        let err = measure(&Device::Cpu, || -> anyhow::Result<()> {
            anyhow::bail!("step failed")
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "step failed");
        let nested = measure(&Device::Cpu, || {
            measure(&Device::Cpu, || -> anyhow::Result<()> { Ok(()) })
        });
        assert!(
            nested.unwrap_err().to_string().contains("does not nest"),
            "a second clock on the thread is refused"
        );
        // After both, no clock is left on the thread: a new one is not refused as nested.
        measure(&Device::Cpu, || -> anyhow::Result<()> { Ok(()) }).unwrap();
    }
}
