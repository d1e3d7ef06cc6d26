//! Consistency decisions: is a sync step complete, is this gradient stale, may this worker
//! read yet.
//!
//! Everything here is a plain state machine: no tokio, no locks, no clocks. The store feeds
//! it one event at a time (under the variable's lock) and carries out the answer: apply a
//! gradient, apply the average of a completed step, drop a late gradient, or make a pull
//! wait. One [`VariableClock`] exists per variable; the server's [`Mode`] is fixed at start.

use std::collections::BTreeMap;
use std::fmt;

/// How gradients from several workers combine on one server. Chosen at start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Bulk-synchronous: step `t` completes when `replicas_to_aggregate` distinct workers
    /// pushed a gradient for it; their average (summed in worker-id order) is applied once.
    Sync {
        /// Workers in the job (`n`); worker ids are `0..n`.
        num_workers: u32,
        /// Gradients that complete a step (`k` of `n`; `k = n` unless backup workers are wanted).
        replicas_to_aggregate: u32,
    },
    /// Every gradient is applied on arrival; staleness is recorded.
    Async {
        /// Workers in the job; worker ids are `0..n`.
        num_workers: u32,
        /// Divide the learning rate by the gradient's staleness (when it is above 1).
        lr_div_staleness: bool,
    },
    /// Stale-synchronous parallel: applied on arrival like `Async`, but a worker may not read
    /// for step `t` until every worker has pushed step `t - max_staleness - 1`.
    Bounded {
        /// Workers in the job; worker ids are `0..n`.
        num_workers: u32,
        /// How many steps the fastest worker may run ahead of the slowest (`0` is lock-step).
        max_staleness: u64,
        /// Divide the learning rate by the gradient's staleness (when it is above 1).
        lr_div_staleness: bool,
    },
}

impl Mode {
    /// Number of workers whose ids this mode accepts.
    pub fn num_workers(&self) -> u32 {
        match *self {
            Mode::Sync { num_workers, .. }
            | Mode::Async { num_workers, .. }
            | Mode::Bounded { num_workers, .. } => num_workers,
        }
    }

    /// `sync`, `async` or `bounded`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Sync { .. } => "sync",
            Mode::Async { .. } => "async",
            Mode::Bounded { .. } => "bounded",
        }
    }

    /// Checks the parameters; the message says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_workers() == 0 {
            return Err("the number of workers must be at least 1".into());
        }
        if let Mode::Sync { num_workers, replicas_to_aggregate } = *self {
            if replicas_to_aggregate == 0 || replicas_to_aggregate > num_workers {
                return Err(format!(
                    "replicas_to_aggregate must be between 1 and the number of workers ({num_workers}), got {replicas_to_aggregate}"
                ));
            }
        }
        Ok(())
    }
}

/// Why a push was refused. The variable is left as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushRefusal {
    /// The worker id is outside `0..num_workers`.
    UnknownWorker { worker: u32, num_workers: u32 },
    /// A gradient for a step the worker cannot have pulled: past the current sync step, or
    /// (bounded) past the slowest worker's clock plus the staleness bound (`current`).
    FutureStep { step: u64, current: u64 },
    /// The same worker already pushed a gradient for this step (sync or bounded).
    Duplicate { worker: u32, step: u64 },
    /// An async gradient computed from a version the variable has not reached.
    FutureVersion { base_version: u64, current: u64 },
}

impl fmt::Display for PushRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushRefusal::UnknownWorker { worker, num_workers } => {
                write!(f, "worker id {worker} is out of range: this job has {num_workers} workers (ids 0..{num_workers})")
            }
            PushRefusal::FutureStep { step, current } => write!(
                f,
                "gradient for step {step} is ahead of the current step {current}: a worker pushes for the step it pulled"
            ),
            PushRefusal::Duplicate { worker, step } => {
                write!(f, "worker {worker} already pushed a gradient for step {step}")
            }
            PushRefusal::FutureVersion { base_version, current } => write!(
                f,
                "gradient computed from version {base_version}, but the variable is only at version {current}"
            ),
        }
    }
}

/// What to do with an accepted push. `G` is the gradient payload (opaque to this module).
#[derive(Debug, PartialEq)]
pub enum PushDecision<G> {
    /// Apply `grad` now, scaling the learning rate by `lr_scale` (async and bounded modes).
    /// The variable's version has already advanced.
    Apply { grad: G, staleness: u64, lr_scale: f32 },
    /// Held for the current sync step, which still waits for other workers.
    Buffered { step: u64, have: u32, need: u32 },
    /// The sync step is complete: apply the mean of `grads` (already in worker-id order,
    /// sum them in that order). The variable's version has already advanced to `step + 1`.
    ApplyMean { step: u64, grads: Vec<(u32, G)> },
    /// A late gradient for a step that already completed: dropped, nothing changes.
    DropStale { step: u64, current: u64 },
}

/// Whether a pull may be served now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadGate {
    /// Serve the current values.
    Ready,
    /// Wait for more pushes. `missing` lists the workers whose gradients would let the read
    /// proceed (for the error message if the wait times out).
    Wait { missing: Vec<u32> },
}

/// Per-variable consistency state for one [`Mode`].
#[derive(Debug)]
pub struct VariableClock<G> {
    mode: Mode,
    /// Completed sync steps, or applied updates in async/bounded modes: the version that
    /// pulls report and async pushes measure their staleness against.
    version: u64,
    /// Sync: gradients received for step `version`, keyed (and so ordered) by worker id.
    pending: BTreeMap<u32, G>,
    /// Bounded: per worker, the number of steps it has pushed (its last step + 1).
    clocks: Vec<u64>,
    /// Bounded, after a restore: workers that have not pushed to this variable since. Their
    /// clocks (from the checkpoint) lag by the steps the restore lost, which they push again
    /// only when they next push this variable; a worker may first have to finish a step whose
    /// other parts wait on the workers that are catching up here. So until a worker shows
    /// up, neither gate counts it (the bound is looser for that while).
    absent: Vec<bool>,
}

impl<G> VariableClock<G> {
    /// A fresh variable at version 0. `mode` must have passed [`Mode::validate`].
    pub fn new(mode: Mode) -> Self {
        let clocks = match mode {
            Mode::Bounded { num_workers, .. } => vec![0; num_workers as usize],
            _ => Vec::new(),
        };
        let absent = vec![false; clocks.len()];
        VariableClock { mode, version: 0, pending: BTreeMap::new(), clocks, absent }
    }

    /// Current version (completed sync steps, or applied updates).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Workers whose gradient for the current sync step has arrived, in id order.
    pub fn arrived(&self) -> Vec<u32> {
        self.pending.keys().copied().collect()
    }

    /// Decides what a push of `grad` from `worker` does. `step` is the worker's step (sync
    /// step, bounded clock); `base_version` the version the gradient was computed from.
    pub fn on_push(
        &mut self,
        worker: u32,
        step: u64,
        base_version: u64,
        grad: G,
    ) -> Result<PushDecision<G>, PushRefusal> {
        let num_workers = self.mode.num_workers();
        if worker >= num_workers {
            return Err(PushRefusal::UnknownWorker { worker, num_workers });
        }
        match self.mode {
            Mode::Sync { replicas_to_aggregate, .. } => {
                let current = self.version;
                if step < current {
                    return Ok(PushDecision::DropStale { step, current });
                }
                if step > current {
                    return Err(PushRefusal::FutureStep { step, current });
                }
                if self.pending.contains_key(&worker) {
                    return Err(PushRefusal::Duplicate { worker, step });
                }
                self.pending.insert(worker, grad);
                let have = self.pending.len() as u32;
                if have < replicas_to_aggregate {
                    return Ok(PushDecision::Buffered { step, have, need: replicas_to_aggregate });
                }
                let grads = std::mem::take(&mut self.pending).into_iter().collect();
                self.version += 1;
                Ok(PushDecision::ApplyMean { step, grads })
            }
            Mode::Async { lr_div_staleness, .. } => self.apply_on_arrival(base_version, lr_div_staleness, grad),
            Mode::Bounded { max_staleness, lr_div_staleness, .. } => {
                if step < self.clocks[worker as usize] {
                    // A retry of a push that was applied: applying it again would count twice.
                    return Err(PushRefusal::Duplicate { worker, step });
                }
                self.absent[worker as usize] = false;
                // A worker pushes for a step it was allowed to read: at most `max_staleness`
                // past the slowest worker (or a lying step would lift it out of the gate).
                let limit = self.slowest_present().saturating_add(max_staleness);
                if step > limit {
                    return Err(PushRefusal::FutureStep { step, current: limit });
                }
                let decision = self.apply_on_arrival(base_version, lr_div_staleness, grad)?;
                self.clocks[worker as usize] = step.saturating_add(1);
                Ok(decision)
            }
        }
    }

    fn apply_on_arrival(
        &mut self,
        base_version: u64,
        lr_div_staleness: bool,
        grad: G,
    ) -> Result<PushDecision<G>, PushRefusal> {
        if base_version > self.version {
            return Err(PushRefusal::FutureVersion { base_version, current: self.version });
        }
        let staleness = self.version - base_version;
        let lr_scale = if lr_div_staleness && staleness > 1 { 1.0 / staleness as f32 } else { 1.0 };
        self.version += 1;
        Ok(PushDecision::Apply { grad, staleness, lr_scale })
    }

    /// May `worker` read the variable for its step `step`?
    ///
    /// Sync: once the variable has reached version `step`. Bounded: once every worker has
    /// pushed `step - max_staleness` steps. Async: always.
    pub fn read_gate(&self, step: u64) -> ReadGate {
        match self.mode {
            Mode::Sync { num_workers, .. } => {
                if step <= self.version {
                    ReadGate::Ready
                } else if step == self.version + 1 {
                    let missing = (0..num_workers).filter(|w| !self.pending.contains_key(w)).collect();
                    ReadGate::Wait { missing }
                } else {
                    ReadGate::Wait { missing: (0..num_workers).collect() }
                }
            }
            Mode::Async { .. } => ReadGate::Ready,
            Mode::Bounded { max_staleness, .. } => {
                let need = step.saturating_sub(max_staleness);
                let missing: Vec<u32> = (0..self.clocks.len() as u32)
                    .filter(|&w| !self.absent[w as usize] && self.clocks[w as usize] < need)
                    .collect();
                if missing.is_empty() {
                    ReadGate::Ready
                } else {
                    ReadGate::Wait { missing }
                }
            }
        }
    }

    /// Bounded: the lowest clock of the workers that count (see `absent`).
    fn slowest_present(&self) -> u64 {
        self.clocks.iter().zip(&self.absent).filter(|(_, &a)| !a).map(|(&c, _)| c).min().unwrap_or(0)
    }

    /// Bounded mode: each worker's pushed steps (empty in the other modes).
    pub fn worker_clocks(&self) -> &[u64] {
        &self.clocks
    }

    /// Restores the version and, in bounded mode, the workers' clocks (from a checkpoint:
    /// `clocks` as [`worker_clocks`](Self::worker_clocks) gave them, or empty to start
    /// every worker at `version`'s step); in bounded mode no worker counts in the gates
    /// until it pushes again (see `absent`). Drops buffered gradients.
    pub fn restore(&mut self, version: u64, clocks: &[u64]) -> Result<(), String> {
        if let Mode::Bounded { num_workers, .. } = self.mode {
            if clocks.is_empty() {
                self.clocks = vec![version; num_workers as usize];
            } else if clocks.len() == num_workers as usize {
                self.clocks = clocks.to_vec();
            } else {
                return Err(format!("the checkpoint has clocks of {} workers, this server runs {num_workers}", clocks.len()));
            }
            self.absent = vec![true; num_workers as usize];
        }
        self.version = version;
        self.pending.clear();
        Ok(())
    }

    /// Restores the version (checkpoint restore or assignment); drops buffered gradients.
    pub fn reset_version(&mut self, version: u64) {
        self.version = version;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync(n: u32, k: u32) -> VariableClock<u32> {
        VariableClock::new(Mode::Sync { num_workers: n, replicas_to_aggregate: k })
    }

    /// Each row: (worker, step) pushes in arrival order, and the expected decision kind.
    #[derive(Debug, PartialEq)]
    enum Kind {
        Buffered(u32),
        Mean(Vec<u32>),
        Stale,
        Refused,
    }

    fn kind(d: Result<PushDecision<u32>, PushRefusal>) -> Kind {
        match d {
            Ok(PushDecision::Buffered { have, .. }) => Kind::Buffered(have),
            Ok(PushDecision::ApplyMean { grads, .. }) => Kind::Mean(grads.into_iter().map(|(w, _)| w).collect()),
            Ok(PushDecision::DropStale { .. }) => Kind::Stale,
            Ok(PushDecision::Apply { .. }) => panic!("sync mode never applies on arrival"),
            Err(_) => Kind::Refused,
        }
    }

    #[test]
    fn sync_step_completion_table() {
        use Kind::*;
        /// (n, k, pushes as (worker, step), expected kinds, final version)
        type Row = (u32, u32, Vec<(u32, u64)>, Vec<Kind>, u64);
        let table: Vec<Row> = vec![
            // all of n, arrival order does not matter for the order of the mean
            (3, 3, vec![(2, 0), (0, 0), (1, 0)], vec![Buffered(1), Buffered(2), Mean(vec![0, 1, 2])], 1),
            // k of n: the first k complete the step, the late one is dropped
            (4, 2, vec![(3, 0), (1, 0), (0, 0)], vec![Buffered(1), Mean(vec![1, 3]), Stale], 1),
            // one worker: every push completes a step
            (1, 1, vec![(0, 0), (0, 1), (0, 2)], vec![Mean(vec![0]), Mean(vec![0]), Mean(vec![0])], 3),
            // a push for a future step and a duplicate are refused and change nothing
            (2, 2, vec![(0, 1), (0, 0), (0, 0), (1, 0)], vec![Refused, Buffered(1), Refused, Mean(vec![0, 1])], 1),
            // unknown worker
            (2, 2, vec![(2, 0)], vec![Refused], 0),
            // two full steps, then a very late gradient for step 0
            (2, 2, vec![(1, 0), (0, 0), (0, 1), (1, 1), (1, 0)], vec![Buffered(1), Mean(vec![0, 1]), Buffered(1), Mean(vec![0, 1]), Stale], 2),
        ];
        for (i, (n, k, pushes, want, version)) in table.into_iter().enumerate() {
            let mut c = sync(n, k);
            let got: Vec<Kind> = pushes.iter().map(|&(w, s)| kind(c.on_push(w, s, s, w))).collect();
            assert_eq!(got, want, "row {i}");
            assert_eq!(c.version(), version, "row {i}");
        }
    }

    #[test]
    fn sync_mean_carries_payloads_in_worker_order() {
        let mut c = sync(3, 3);
        c.on_push(2, 0, 0, 20).unwrap();
        c.on_push(0, 0, 0, 0).unwrap();
        let d = c.on_push(1, 0, 0, 10).unwrap();
        assert_eq!(d, PushDecision::ApplyMean { step: 0, grads: vec![(0, 0), (1, 10), (2, 20)] });
    }

    #[test]
    fn sync_refusals_say_what_was_wrong() {
        let mut c = sync(2, 2);
        assert_eq!(c.on_push(0, 5, 5, 0), Err(PushRefusal::FutureStep { step: 5, current: 0 }));
        assert_eq!(c.on_push(7, 0, 0, 0), Err(PushRefusal::UnknownWorker { worker: 7, num_workers: 2 }));
        c.on_push(0, 0, 0, 0).unwrap();
        assert_eq!(c.on_push(0, 0, 0, 0), Err(PushRefusal::Duplicate { worker: 0, step: 0 }));
        assert!(PushRefusal::Duplicate { worker: 0, step: 0 }.to_string().contains("worker 0"));
    }

    #[test]
    fn sync_read_gate_table() {
        let mut c = sync(3, 3);
        // (step asked, expected gate) after worker 1 pushed step 0
        c.on_push(1, 0, 0, 0).unwrap();
        let table = [
            (0, ReadGate::Ready),
            (1, ReadGate::Wait { missing: vec![0, 2] }),
            (2, ReadGate::Wait { missing: vec![0, 1, 2] }),
        ];
        for (step, want) in table {
            assert_eq!(c.read_gate(step), want, "step {step}");
        }
        c.on_push(0, 0, 0, 0).unwrap();
        c.on_push(2, 0, 0, 0).unwrap();
        assert_eq!(c.read_gate(1), ReadGate::Ready);
    }

    #[test]
    fn async_staleness_table() {
        // (base_version of each push in arrival order) → (staleness, lr_scale) with lr ÷ staleness on
        let mut c: VariableClock<()> = VariableClock::new(Mode::Async { num_workers: 4, lr_div_staleness: true });
        let table = [(0, 0, 1.0), (0, 1, 1.0), (0, 2, 0.5), (3, 0, 1.0), (1, 3, 1.0 / 3.0), (5, 0, 1.0)];
        for (i, (base, staleness, scale)) in table.into_iter().enumerate() {
            match c.on_push((i % 4) as u32, 0, base, ()).unwrap() {
                PushDecision::Apply { staleness: s, lr_scale, .. } => {
                    assert_eq!((s, lr_scale), (staleness, scale), "push {i}");
                }
                other => panic!("push {i}: {other:?}"),
            }
        }
        assert_eq!(c.version(), 6);
        assert_eq!(c.on_push(0, 0, 7, ()), Err(PushRefusal::FutureVersion { base_version: 7, current: 6 }));
        assert_eq!(c.read_gate(1000), ReadGate::Ready);
    }

    #[test]
    fn async_without_scaling_keeps_lr() {
        let mut c: VariableClock<()> = VariableClock::new(Mode::Async { num_workers: 1, lr_div_staleness: false });
        for _ in 0..5 {
            c.on_push(0, 0, 0, ()).unwrap();
        }
        match c.on_push(0, 0, 0, ()).unwrap() {
            PushDecision::Apply { staleness, lr_scale, .. } => assert_eq!((staleness, lr_scale), (5, 1.0)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bounded_gating_table() {
        // 3 workers, staleness bound 1. Rows: pushes (worker, step) so far → read gate for (step).
        let mode = Mode::Bounded { num_workers: 3, max_staleness: 1, lr_div_staleness: false };
        let mut c: VariableClock<()> = VariableClock::new(mode);
        assert_eq!(c.read_gate(0), ReadGate::Ready);
        assert_eq!(c.read_gate(1), ReadGate::Ready, "one step ahead of nobody's push is within the bound");
        assert_eq!(c.read_gate(2), ReadGate::Wait { missing: vec![0, 1, 2] });
        c.on_push(0, 0, 0, ()).unwrap();
        c.on_push(0, 1, 1, ()).unwrap();
        // worker 0 has done 2 steps, the others none: worker 0 may not start step 2
        assert_eq!(c.read_gate(2), ReadGate::Wait { missing: vec![1, 2] });
        c.on_push(1, 0, 2, ()).unwrap();
        assert_eq!(c.read_gate(2), ReadGate::Wait { missing: vec![2] });
        c.on_push(2, 0, 3, ()).unwrap();
        assert_eq!(c.read_gate(2), ReadGate::Ready);
        assert_eq!(c.read_gate(3), ReadGate::Wait { missing: vec![1, 2] });
    }

    #[test]
    fn bounded_refuses_retries_and_steps_past_the_bound() {
        // 2 workers, bound 2. Rows: (worker, step) → accepted, or the refusal.
        let mode = Mode::Bounded { num_workers: 2, max_staleness: 2, lr_div_staleness: false };
        let mut c: VariableClock<()> = VariableClock::new(mode);
        let table: [((u32, u64), Result<(), PushRefusal>); 8] = [
            ((0, 0), Ok(())),
            ((0, 0), Err(PushRefusal::Duplicate { worker: 0, step: 0 })), // a retry
            ((0, 3), Err(PushRefusal::FutureStep { step: 3, current: 2 })), // worker 1 is at 0
            ((0, 2), Ok(())),                                               // skipping step 1 is allowed
            ((0, 1), Err(PushRefusal::Duplicate { worker: 0, step: 1 })),   // behind its own clock
            ((1, u64::MAX), Err(PushRefusal::FutureStep { step: u64::MAX, current: 2 })),
            ((1, 0), Ok(())),
            ((0, 3), Ok(())), // the slowest is now at 1
        ];
        for ((worker, step), want) in table {
            let version = c.version();
            let got = c.on_push(worker, step, version, ()).map(|_| ());
            assert_eq!(got, want, "push ({worker}, {step})");
        }
        assert_eq!(c.version(), 4, "four pushes applied");
        assert_eq!(c.read_gate(4), ReadGate::Wait { missing: vec![1] });
    }

    #[test]
    fn bounded_zero_is_lock_step() {
        let mode = Mode::Bounded { num_workers: 2, max_staleness: 0, lr_div_staleness: false };
        let mut c: VariableClock<()> = VariableClock::new(mode);
        c.on_push(0, 0, 0, ()).unwrap();
        assert_eq!(c.read_gate(1), ReadGate::Wait { missing: vec![1] });
        c.on_push(1, 0, 0, ()).unwrap();
        assert_eq!(c.read_gate(1), ReadGate::Ready);
        // bounded staleness still records async staleness: worker 1 computed from version 0
        assert_eq!(c.version(), 2);
    }

    #[test]
    fn mode_validation_table() {
        let table = [
            (Mode::Sync { num_workers: 4, replicas_to_aggregate: 4 }, true),
            (Mode::Sync { num_workers: 4, replicas_to_aggregate: 3 }, true),
            (Mode::Sync { num_workers: 4, replicas_to_aggregate: 5 }, false),
            (Mode::Sync { num_workers: 4, replicas_to_aggregate: 0 }, false),
            (Mode::Async { num_workers: 0, lr_div_staleness: false }, false),
            (Mode::Bounded { num_workers: 2, max_staleness: 0, lr_div_staleness: true }, true),
        ];
        for (mode, ok) in table {
            assert_eq!(mode.validate().is_ok(), ok, "{mode:?}");
        }
    }

    /// After a restore, a bounded variable counts in its gates only the workers that have
    /// pushed to it since: one catching up is not held back by one that has not come back
    /// to this variable yet (it may be waiting on the first elsewhere).
    #[test]
    fn a_restored_bounded_variable_gates_only_on_workers_that_came_back() {
        let mut c: VariableClock<()> = VariableClock::new(Mode::Bounded { num_workers: 3, max_staleness: 2, lr_div_staleness: false });
        c.restore(30, &[10, 10, 11]).unwrap();
        assert_eq!(c.read_gate(14), ReadGate::Ready, "nobody has come back: nobody holds a pull");
        assert!(matches!(c.on_push(1, 13, 30, ()), Err(PushRefusal::FutureStep { step: 13, current: 12 })), "a worker's own lost steps first");
        for step in 10..=13 {
            assert!(matches!(c.on_push(1, step, 30, ()), Ok(PushDecision::Apply { .. })), "step {step}");
        }
        assert_eq!(c.read_gate(16), ReadGate::Ready, "workers 0 and 2 have not come back yet");
        assert!(matches!(c.on_push(0, 10, 30, ()), Ok(PushDecision::Apply { .. })));
        assert_eq!(c.read_gate(14), ReadGate::Wait { missing: vec![0] }, "worker 0 counts again, at 11");
        assert!(matches!(c.on_push(1, 14, 30, ()), Err(PushRefusal::FutureStep { step: 14, current: 13 })), "and bounds the others again");
        assert!(matches!(c.on_push(0, 9, 30, ()), Err(PushRefusal::Duplicate { worker: 0, step: 9 })));
    }
}
