//! The handover protocol's decisions, without I/O: who runs each session.
//!
//! The old process runs a session until it is offered; while offered the
//! session's task waits and touches neither socket. An `Ack` read from the
//! new process releases it (its descriptors close without `shutdown()`);
//! a `Nack`, or losing the takeover socket, resumes it in the old process.
//!
//! The new process runs a session only once its `Ack` was written whole.
//! When the old process gives up (new process dead, socket broken or
//! silent too long) it shuts the socket down both ways first, then reads
//! what is still buffered: an `Ack` written before the shutdown is read and
//! honoured, one written after it fails in the new process (`EPIPE`), which
//! then closes its copies without running the session. So a session is
//! never run by both processes, and never by neither while both live.

use std::collections::BTreeMap;

/// The old process's view of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Running here; may be offered.
    Running,
    /// Sent to the new process; its task waits for the verdict.
    Offered,
    /// The new process runs it; forgotten here.
    Released,
    /// Came back (refused, or the new process is gone); running here and
    /// not offered again by this takeover.
    Resumed,
}

/// What the old process does with a session after a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Close the descriptors without `shutdown()`: the new process runs it.
    Release,
    /// Continue serving it here.
    Resume,
}

/// A message the protocol does not allow (answered by giving up the
/// takeover: every offered session resumes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("takeover protocol violation: {0}")]
pub struct Violation(pub String);

/// The old process's ledger of one takeover.
#[derive(Debug, Default)]
pub struct OldLedger {
    held: BTreeMap<u32, Held>,
    lost: bool,
}

impl OldLedger {
    /// A session running here takes part in the takeover.
    pub fn track(&mut self, id: u32) {
        self.held.entry(id).or_insert(Held::Running);
    }

    /// Whether `id` may be sent now (running here, socket still up).
    pub fn may_offer(&self, id: u32) -> bool {
        !self.lost && self.held.get(&id) == Some(&Held::Running)
    }

    /// `id` was written to the socket.
    pub fn handle_offered(&mut self, id: u32) {
        if self.may_offer(id) {
            self.held.insert(id, Held::Offered);
        }
    }

    /// The new process answered for `id`.
    pub fn handle_answer(&mut self, id: u32, acked: bool) -> Result<Verdict, Violation> {
        match self.held.get(&id) {
            Some(Held::Offered) => {
                let (h, v) = if acked {
                    (Held::Released, Verdict::Release)
                } else {
                    (Held::Resumed, Verdict::Resume)
                };
                self.held.insert(id, h);
                Ok(v)
            }
            other => Err(Violation(format!(
                "an answer for session {id}, which is {other:?} here"
            ))),
        }
    }

    /// The socket is shut down and what was buffered has been read: every
    /// session still offered resumes here. Returns them.
    pub fn handle_lost(&mut self) -> Vec<u32> {
        self.lost = true;
        let mut back = Vec::new();
        for (id, h) in &mut self.held {
            if *h == Held::Offered {
                *h = Held::Resumed;
                back.push(*id);
            }
        }
        back
    }

    /// A session ended by itself (its client left) before it was offered.
    pub fn handle_ended(&mut self, id: u32) {
        if matches!(self.held.get(&id), Some(Held::Running | Held::Resumed)) {
            self.held.remove(&id);
        }
    }

    /// Sessions still waiting for a verdict.
    pub fn offered(&self) -> usize {
        self.held.values().filter(|h| **h == Held::Offered).count()
    }

    /// Sessions handed over so far.
    pub fn released(&self) -> usize {
        self.held.values().filter(|h| **h == Held::Released).count()
    }

    /// This process's state of `id`.
    pub fn get(&self, id: u32) -> Option<Held> {
        self.held.get(&id).copied()
    }

    /// Whether the old process runs (or will resume) `id`.
    pub fn runs(&self, id: u32) -> bool {
        matches!(self.held.get(&id), Some(Held::Running | Held::Resumed))
    }
}

/// What the new process does with a received session once it tried to
/// write its `Ack`.
pub fn after_ack(written: bool) -> Verdict {
    if written {
        Verdict::Release // runs here: the old one releases it
    } else {
        // The old process gave up first: it resumes the session, so this
        // one closes its copies without shutdown() and never runs it.
        Verdict::Resume
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, VecDeque};

    /// One step of either process, the kernel or a crash.
    #[derive(Debug, Clone)]
    enum Step {
        /// The old process offers session `n % N`.
        Offer(u8),
        /// The new process takes the next session off the socket; the
        /// import succeeds or not.
        NewReceives(bool),
        /// The old process reads the next answer.
        OldReads,
        /// The old process gives up (timeout): shutdown, drain, resume.
        OldGivesUp,
        /// The new process dies (kill -9).
        NewCrashes,
        /// A client leaves a session the old process runs.
        ClientLeaves(u8),
    }

    const N: u32 = 6;

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => any::<u8>().prop_map(Step::Offer),
            4 => any::<bool>().prop_map(Step::NewReceives),
            4 => Just(Step::OldReads),
            1 => Just(Step::OldGivesUp),
            1 => Just(Step::NewCrashes),
            1 => any::<u8>().prop_map(Step::ClientLeaves),
        ]
    }

    /// The two processes and the socket between them.
    #[derive(Default)]
    struct World {
        old: OldLedger,
        /// Sessions the new process runs.
        new_runs: BTreeSet<u32>,
        new_alive: bool,
        /// Old to new: offered sessions in flight.
        to_new: VecDeque<u32>,
        /// New to old: answers in flight (id, acked).
        to_old: VecDeque<(u32, bool)>,
        /// The old process shut the socket down.
        shut: bool,
        /// Sessions whose clients left (owned by nobody, rightly).
        ended: BTreeSet<u32>,
        /// Sessions that died with the new process.
        died: BTreeSet<u32>,
    }

    impl World {
        fn give_up(&mut self) {
            self.shut = true;
            // What was written before the shutdown is still read.
            while let Some((id, acked)) = self.to_old.pop_front() {
                self.old.handle_answer(id, acked).expect("a valid answer");
            }
            // What the old process sent stays readable by the new one,
            // whose answers now fail (EPIPE).
            self.old.handle_lost();
        }

        fn apply(&mut self, s: Step) {
            match s {
                Step::Offer(n) => {
                    let id = u32::from(n) % N;
                    if self.old.may_offer(id) && !self.shut {
                        self.old.handle_offered(id);
                        self.to_new.push_back(id);
                    }
                }
                Step::NewReceives(import_ok) => {
                    if !self.new_alive {
                        return;
                    }
                    let Some(id) = self.to_new.pop_front() else {
                        return;
                    };
                    // The write fails once the old process shut down.
                    let written = !self.shut;
                    if written {
                        self.to_old.push_back((id, import_ok));
                    }
                    if import_ok && after_ack(written) == Verdict::Release {
                        self.new_runs.insert(id);
                    }
                }
                Step::OldReads => {
                    if let Some((id, acked)) = self.to_old.pop_front() {
                        let v = self.old.handle_answer(id, acked).expect("a valid answer");
                        assert_eq!(v == Verdict::Release, acked);
                    }
                }
                Step::OldGivesUp => {
                    if !self.shut {
                        self.give_up();
                    }
                }
                Step::NewCrashes => {
                    if self.new_alive {
                        self.new_alive = false;
                        self.died.extend(std::mem::take(&mut self.new_runs));
                        // The old process sees EOF after what was buffered.
                        if !self.shut {
                            self.give_up();
                        }
                    }
                }
                Step::ClientLeaves(n) => {
                    let id = u32::from(n) % N;
                    if self.old.runs(id) {
                        self.old.handle_ended(id);
                        self.ended.insert(id);
                    }
                }
            }
        }

        /// Never both; never neither unless the client left or the new
        /// process (which ran it) died.
        fn check(&self, quiescent: bool) {
            assert!(!self.shut || self.to_old.is_empty());
            for id in 0..N {
                let old = self.old.runs(id);
                let new = self.new_runs.contains(&id);
                assert!(!(old && new), "session {id} runs in both processes");
                let gone = self.ended.contains(&id) || self.died.contains(&id);
                let waiting = self.old.get(id) == Some(Held::Offered);
                if quiescent || !waiting {
                    assert!(old || new || gone, "session {id} is run by no process");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn no_session_is_lost_or_duplicated(steps in proptest::collection::vec(step(), 0..60)) {
            let mut w = World { new_alive: true, ..Default::default() };
            for id in 0..N {
                w.old.track(id);
            }
            for s in steps {
                w.apply(s);
                w.check(false);
            }
            // Run to quiescence: the new process answers everything it
            // received, the old reads every answer, then finishes.
            while w.new_alive && !w.to_new.is_empty() {
                w.apply(Step::NewReceives(true));
            }
            while !w.to_old.is_empty() {
                w.apply(Step::OldReads);
            }
            if !w.shut {
                w.give_up();
            }
            w.check(true);
            prop_assert_eq!(w.old.offered(), 0);
        }
    }

    #[test]
    fn an_answer_for_a_session_not_offered_is_a_violation() {
        let mut l = OldLedger::default();
        l.track(1);
        assert!(l.handle_answer(1, true).is_err());
        l.handle_offered(1);
        assert_eq!(l.handle_answer(1, true), Ok(Verdict::Release));
        assert!(l.handle_answer(1, true).is_err());
        assert_eq!(l.released(), 1);
    }
}
