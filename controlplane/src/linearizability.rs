//! Linearizability checking of client histories recorded against the store, in the manner of
//! Porcupine: Wing & Gong's backtracking search over the call/return events, with Lowe's cache of
//! (linearized set, model state) so that no configuration is explored twice. The model is a
//! key-value register; because a register history is linearizable exactly when each key's
//! sub-history is (P-compositionality), keys are checked one at a time, which keeps every search
//! small. A call that failed or timed out may have taken effect at any point after its invocation,
//! or not at all. When a key is not linearizable, the history is shrunk to a small set of
//! operations that still cannot be ordered, and that set is what the explanation names.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// What a client asked the store to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Set `key` to `value`.
    Write { key: String, value: u64 },
    /// Fetch the current value of `key`.
    Read { key: String },
}

impl Input {
    /// The key this call touches.
    pub fn key(&self) -> &str {
        match self {
            Input::Write { key, .. } | Input::Read { key } => key,
        }
    }
}

/// What the store answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// The write was acknowledged.
    WriteOk,
    /// The value read; `None` when the key was absent.
    Read(Option<u64>),
}

/// One call of a history, from its invocation to its response (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Who made the call; a client has at most one call outstanding.
    pub client: u64,
    /// What was asked.
    pub input: Input,
    /// What was answered; `None` when the call failed or timed out.
    pub output: Option<Output>,
    /// When the call was made.
    pub invoke: u64,
    /// When the answer arrived; `None` when the call failed or timed out.
    pub ret: Option<u64>,
}

/// The verdict of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every key's sub-history is linearizable.
    Ok,
    /// `key`'s sub-history is not linearizable; `explanation` names operations that cannot be ordered.
    Violation { key: String, explanation: String },
    /// The budget ran out while checking `key`; nothing was proven about it or the keys after it.
    Unknown { key: String },
}

/// Handle on a call recorded by [`History::invoke`], to complete it with [`History::ret`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OpId(usize);

/// Records a history as calls are made and answered; calls never answered count as failed.
#[derive(Debug, Clone, Default)]
pub struct History {
    ops: Vec<Operation>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `client` made the call `input` at `time`.
    pub fn invoke(&mut self, client: u64, input: Input, time: u64) -> OpId {
        self.ops.push(Operation { client, input, output: None, invoke: time, ret: None });
        OpId(self.ops.len() - 1)
    }

    /// Records that call `id` was answered with `output` at `time`.
    pub fn ret(&mut self, id: OpId, output: Output, time: u64) {
        // An id from another history is ignored rather than trusted: recording must never bring
        // down the test that records.
        if let Some(op) = self.ops.get_mut(id.0) {
            op.output = Some(output);
            op.ret = Some(time);
        }
    }

    /// The calls recorded so far, in invocation order.
    pub fn operations(&self) -> &[Operation] {
        &self.ops
    }
}

/// Checks that `history` is linearizable for a key-value register whose keys all start absent.
/// With a `budget`, gives up with [`Outcome::Unknown`] once it is spent.
pub fn check(history: &[Operation], budget: Option<Duration>) -> Outcome {
    // A budget too large to represent is no budget at all.
    let deadline = budget.and_then(|budget| Instant::now().checked_add(budget));
    let mut keys = match partition(history) {
        Ok(keys) => keys,
        Err(malformed) => return Outcome::Violation { key: malformed.key, explanation: malformed.explanation },
    };
    // Small keys first: a violation in a cheap key is found even when an expensive key would
    // spend the whole budget.
    keys.sort_by(|(a_key, a_ops), (b_key, b_ops)| a_ops.len().cmp(&b_ops.len()).then_with(|| a_key.cmp(b_key)));
    for (key, ops) in keys {
        let mut limits = Limits::new(deadline, u64::MAX);
        match search(&ops, &mut limits) {
            Verdict::Linearizable => {}
            Verdict::OutOfBudget => return Outcome::Unknown { key: key.to_string() },
            Verdict::NotLinearizable => {
                let mut limits = Limits::new(deadline, SHRINK_STEPS);
                let core = shrink(ops, &mut limits);
                return Outcome::Violation { key: key.to_string(), explanation: explain(key, &core) };
            }
        }
    }
    Outcome::Ok
}

/// Return time of a call that never answered: it stays pending until the end of the history.
const NEVER: u64 = u64::MAX;

/// Search steps allowed for shrinking a violation, so that the explanation never costs more than
/// a bounded multiple of finding it; a larger set of operations is reported when this runs out.
const SHRINK_STEPS: u64 = 5_000_000;

/// How many search steps pass between two looks at the clock, which is far slower than a step.
const CLOCK_EVERY: u64 = 1024;

/// What one operation does to a single register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Write(u64),
    Read(Option<u64>),
}

/// An operation of one key's sub-history, with failures already resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyOp {
    client: u64,
    effect: Effect,
    invoke: u64,
    ret: u64,
}

impl KeyOp {
    /// The register's state after this operation, or `None` if it cannot happen in `state`.
    fn step(&self, state: Option<u64>) -> Option<Option<u64>> {
        match self.effect {
            Effect::Write(value) => Some(Some(value)),
            Effect::Read(seen) => (seen == state).then_some(state),
        }
    }
}

/// A history the checker cannot interpret, reported as a violation on the key it touches.
struct Malformed {
    key: String,
    explanation: String,
}

/// Splits `history` into per-key sub-histories, dropping what cannot constrain the search.
fn partition(history: &[Operation]) -> Result<Vec<(&str, Vec<KeyOp>)>, Malformed> {
    let mut keys: BTreeMap<&str, Vec<KeyOp>> = BTreeMap::new();
    for op in history {
        let key = op.input.key();
        let (effect, ret) = match (&op.input, op.output, op.ret) {
            // A failed read observed nothing anyone can rely on, so it constrains nothing.
            (Input::Read { .. }, None, _) | (Input::Read { .. }, _, None) => continue,
            // A failed write may take effect at any time after its invocation: it stays pending to
            // the end, where linearizing it is the same as leaving it out.
            (Input::Write { value, .. }, None, _) | (Input::Write { value, .. }, _, None) => {
                (Effect::Write(*value), NEVER)
            }
            (Input::Write { value, .. }, Some(Output::WriteOk), Some(ret)) => (Effect::Write(*value), ret),
            (Input::Read { .. }, Some(Output::Read(seen)), Some(ret)) => (Effect::Read(seen), ret),
            (input, Some(output), Some(_)) => {
                return Err(Malformed {
                    key: key.to_string(),
                    explanation: format!(
                        "malformed history: {input:?} by client {} at {} was answered with {output:?}",
                        op.client, op.invoke
                    ),
                });
            }
        };
        if ret < op.invoke {
            return Err(Malformed {
                key: key.to_string(),
                explanation: format!(
                    "malformed history: {:?} by client {} returned at {ret}, before its invocation at {}",
                    op.input, op.client, op.invoke
                ),
            });
        }
        keys.entry(key).or_default().push(KeyOp { client: op.client, effect, invoke: op.invoke, ret });
    }
    for ops in keys.values_mut() {
        // A write that never returned and whose value no read saw can always be placed last, where
        // nothing observes it; dropping it up front spares the search a call that is pending
        // throughout. Values are compared, not identities, so duplicate values stay correct.
        let seen: HashSet<u64> = ops
            .iter()
            .filter_map(|op| match op.effect {
                Effect::Read(Some(value)) => Some(value),
                _ => None,
            })
            .collect();
        ops.retain(|op| !(op.ret == NEVER && matches!(op.effect, Effect::Write(value) if !seen.contains(&value))));
    }
    Ok(keys.into_iter().collect())
}

/// Result of one search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    OutOfBudget,
}

/// Bounds on the work a search may do: a deadline and a number of steps, both shared by every
/// search that is given the same `Limits`.
struct Limits {
    deadline: Option<Instant>,
    steps_left: u64,
    steps: u64,
    spent: bool,
}

impl Limits {
    fn new(deadline: Option<Instant>, steps: u64) -> Self {
        Self { deadline, steps_left: steps, steps: 0, spent: false }
    }

    /// Accounts for one step; false once the budget is spent, and from then on.
    fn tick(&mut self) -> bool {
        if self.spent || self.steps_left == 0 {
            self.spent = true;
            return false;
        }
        // The clock is read on the first step too, so a zero budget is honoured at once.
        if self.steps.is_multiple_of(CLOCK_EVERY) && self.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            self.spent = true;
            return false;
        }
        self.steps += 1;
        self.steps_left -= 1;
        true
    }
}

/// End of the entry list.
const NIL: usize = usize::MAX;

/// The call and return events of a sub-history in time order, as a doubly linked list: taking an
/// operation out when it is linearized and putting it back when the search backtracks are then
/// constant-time, and since backtracking undoes removals in reverse order, a removed node keeps
/// the links it needs to go back in place.
struct Entries {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Operation of each node; node 0 is the head sentinel.
    op: Vec<usize>,
    is_call: Vec<bool>,
    /// Return node of each operation.
    ret_node: Vec<usize>,
}

impl Entries {
    const HEAD: usize = 0;

    fn new(ops: &[KeyOp]) -> Self {
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (index, op) in ops.iter().enumerate() {
            events.push((op.invoke, false, index));
            events.push((op.ret, true, index));
        }
        // Calls sort before returns at the same time: operations that merely touch are treated as
        // concurrent, which can only accept more histories, never reject a linearizable one.
        events.sort_unstable();
        let len = events.len() + 1;
        let mut entries = Self {
            next: (1..=len).map(|node| if node < len { node } else { NIL }).collect(),
            prev: (0..len).map(|node| node.checked_sub(1).unwrap_or(NIL)).collect(),
            op: vec![0; len],
            is_call: vec![false; len],
            ret_node: vec![NIL; ops.len()],
        };
        for (position, &(_, is_return, op)) in events.iter().enumerate() {
            let node = position + 1;
            entries.op[node] = op;
            entries.is_call[node] = !is_return;
            if is_return {
                entries.ret_node[op] = node;
            }
        }
        entries
    }

    fn first(&self) -> usize {
        self.next[Self::HEAD]
    }

    fn unlink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = next;
        if next != NIL {
            self.prev[next] = prev;
        }
    }

    fn relink(&mut self, node: usize) {
        let (prev, next) = (self.prev[node], self.next[node]);
        self.next[prev] = node;
        if next != NIL {
            self.prev[next] = node;
        }
    }

    /// Takes out the call at `node` and its return.
    fn lift(&mut self, node: usize) {
        let ret = self.ret_node[self.op[node]];
        self.unlink(node);
        self.unlink(ret);
    }

    /// Puts back what `lift(node)` took out.
    fn unlift(&mut self, node: usize) {
        let ret = self.ret_node[self.op[node]];
        self.relink(ret);
        self.relink(node);
    }
}

/// Wing & Gong's search with Lowe's memoization over one key's sub-history.
fn search(ops: &[KeyOp], limits: &mut Limits) -> Verdict {
    let mut entries = Entries::new(ops);
    let mut state: Option<u64> = None;
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    // Two paths that linearized the same operations and reached the same state have the same
    // future, so a configuration met before is not explored again.
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut chosen: Vec<(usize, Option<u64>)> = Vec::new();
    let mut node = entries.first();
    loop {
        if entries.first() == NIL {
            return Verdict::Linearizable;
        }
        if !limits.tick() {
            return Verdict::OutOfBudget;
        }
        if node == NIL || !entries.is_call[node] {
            // The return of an operation not yet linearized: nothing after it may go before it,
            // so the last choice was wrong; undo it and try the next candidate after it.
            let Some((call, before)) = chosen.pop() else {
                return Verdict::NotLinearizable;
            };
            let op = entries.op[call];
            linearized[op / 64] &= !(1 << (op % 64));
            state = before;
            entries.unlift(call);
            node = entries.next[call];
            continue;
        }
        let op = entries.op[node];
        if let Some(after) = ops[op].step(state) {
            linearized[op / 64] |= 1 << (op % 64);
            if seen.insert((linearized.clone(), after)) {
                chosen.push((node, state));
                state = after;
                entries.lift(node);
                node = entries.first();
                continue;
            }
            linearized[op / 64] &= !(1 << (op % 64));
        }
        node = entries.next[node];
    }
}

/// Shrinks a non-linearizable sub-history to a small subset that is still not linearizable, by
/// removing chunks of ever smaller size (delta debugging). A read may always go: a linearization
/// of the whole restricts to one of the rest. A write may go only together with every read of its
/// value, for the same reason. So each subset kept proves the original is not linearizable, and
/// the explanation may name the subset alone.
fn shrink(ops: Vec<KeyOp>, limits: &mut Limits) -> Vec<KeyOp> {
    let mut kept = ops;
    let mut chunk = kept.len().div_ceil(2).max(1);
    loop {
        let mut removed_any = false;
        let mut start = 0;
        while start < kept.len() {
            let end = (start + chunk).min(kept.len());
            let candidate = without(&kept, start, end);
            match search(&candidate, limits) {
                Verdict::NotLinearizable => {
                    kept = candidate;
                    removed_any = true;
                }
                Verdict::Linearizable => start = end,
                Verdict::OutOfBudget => return kept,
            }
        }
        if chunk > 1 {
            chunk = chunk.div_ceil(2);
        } else if !removed_any {
            // One more pass at single operations removed nothing: every operation left is needed.
            return kept;
        }
    }
}

/// `ops` without `ops[start..end]` and without every read of a value that one of those wrote.
fn without(ops: &[KeyOp], start: usize, end: usize) -> Vec<KeyOp> {
    let dropped: HashSet<u64> = ops[start..end]
        .iter()
        .filter_map(|op| match op.effect {
            Effect::Write(value) => Some(value),
            Effect::Read(_) => None,
        })
        .collect();
    ops.iter()
        .enumerate()
        .filter(|(index, op)| {
            !(start..end).contains(index) && !matches!(op.effect, Effect::Read(Some(value)) if dropped.contains(&value))
        })
        .map(|(_, op)| *op)
        .collect()
}

/// Says why the operations of `core`, which cannot be ordered, cannot be ordered.
fn explain(key: &str, core: &[KeyOp]) -> String {
    let mut core = core.to_vec();
    core.sort_by_key(|op| (op.invoke, op.ret, op.client));
    if let [only] = core.as_slice()
        && only.effect != Effect::Read(None)
    {
        // A lone read can fail only by returning a value; and since a write goes only together
        // with the reads of its value, no write of that value exists anywhere in the history.
        return format!("{}, a value never written to {key}", describe(key, only));
    }
    let diagnosis = diagnose(key, &core).unwrap_or_else(|| {
        format!(
            "no order of these {} operations on {key} respects both their real-time order and the register's semantics",
            core.len()
        )
    });
    let listed: Vec<String> = core.iter().map(|op| describe(key, op)).collect();
    format!("{diagnosis} (cannot order: {})", listed.join("; "))
}

/// A one-sentence reason for the common shapes of violation with a single read, if `core` has one.
fn diagnose(key: &str, core: &[KeyOp]) -> Option<String> {
    let reads: Vec<&KeyOp> = core.iter().filter(|op| matches!(op.effect, Effect::Read(_))).collect();
    let writes: Vec<&KeyOp> = core.iter().filter(|op| matches!(op.effect, Effect::Write(_))).collect();
    let [read] = reads.as_slice() else {
        return None;
    };
    match (read.effect, writes.as_slice()) {
        (Effect::Read(None), [write]) if write.ret < read.invoke => {
            Some(format!("{}, but the {} had already returned", describe(key, read), describe(key, write)))
        }
        (Effect::Read(Some(value)), [write]) if write.effect == Effect::Write(value) && write.invoke > read.ret => {
            Some(format!(
                "{}, but {value} was written only later, by the {}",
                describe(key, read),
                describe(key, write)
            ))
        }
        (Effect::Read(Some(value)), [old, new])
            if old.effect == Effect::Write(value) && old.ret < new.invoke && new.ret < read.invoke =>
        {
            let Effect::Write(newer) = new.effect else {
                return None;
            };
            (newer != value).then(|| {
                format!(
                    "{}, but {value} was overwritten by the write of {newer} by client {} that returned at {}",
                    describe(key, read),
                    new.client,
                    new.ret
                )
            })
        }
        _ => None,
    }
}

/// One operation in words, for explanations.
fn describe(key: &str, op: &KeyOp) -> String {
    let when = if op.ret == NEVER {
        format!("invoked at {} without a response", op.invoke)
    } else {
        format!("at [{},{}]", op.invoke, op.ret)
    };
    match op.effect {
        Effect::Write(value) => format!("write of {value} to {key} by client {} {when}", op.client),
        Effect::Read(Some(value)) => format!("read of {key} by client {} {when} returned {value}", op.client),
        Effect::Read(None) => format!("read of {key} by client {} {when} returned absent", op.client),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(client: u64, key: &str, value: u64, invoke: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::Write { key: key.to_string(), value },
            output: Some(Output::WriteOk),
            invoke,
            ret: Some(ret),
        }
    }

    fn read(client: u64, key: &str, seen: Option<u64>, invoke: u64, ret: u64) -> Operation {
        Operation {
            client,
            input: Input::Read { key: key.to_string() },
            output: Some(Output::Read(seen)),
            invoke,
            ret: Some(ret),
        }
    }

    /// A write that timed out: no response, so it may or may not have happened.
    fn failed_write(client: u64, key: &str, value: u64, invoke: u64) -> Operation {
        Operation { client, input: Input::Write { key: key.to_string(), value }, output: None, invoke, ret: None }
    }

    /// A read that failed: whatever it saw is not known.
    fn failed_read(client: u64, key: &str, invoke: u64) -> Operation {
        Operation { client, input: Input::Read { key: key.to_string() }, output: None, invoke, ret: None }
    }

    enum Expect {
        Ok,
        /// A violation on this key whose explanation contains this text.
        Violation(&'static str, &'static str),
    }

    #[test]
    fn table_of_histories() {
        let cases: Vec<(&str, Vec<Operation>, Expect)> = vec![
            ("empty history", vec![], Expect::Ok),
            (
                "sequential history",
                vec![
                    read(1, "k", None, 0, 1),
                    write(1, "k", 1, 2, 3),
                    read(2, "k", Some(1), 4, 5),
                    write(2, "k", 2, 6, 7),
                    read(1, "k", Some(2), 8, 9),
                ],
                Expect::Ok,
            ),
            (
                "read concurrent with a write sees the old value",
                vec![write(1, "k", 1, 0, 1), write(1, "k", 2, 2, 6), read(2, "k", Some(1), 3, 4)],
                Expect::Ok,
            ),
            (
                "read concurrent with a write sees the new value",
                vec![write(1, "k", 1, 0, 1), write(1, "k", 2, 2, 6), read(2, "k", Some(2), 3, 4)],
                Expect::Ok,
            ),
            (
                "read invoked at the instant a write returns may still see the old value",
                vec![write(1, "k", 1, 0, 1), write(1, "k", 2, 2, 5), read(2, "k", Some(1), 5, 8)],
                Expect::Ok,
            ),
            (
                "stale read after a write returned",
                vec![write(1, "k", 7, 0, 1), write(2, "k", 9, 2, 11), read(3, "k", Some(7), 12, 15)],
                Expect::Violation(
                    "k",
                    "read of k by client 3 at [12,15] returned 7, but 7 was overwritten by the write of 9 by client 2 \
                     that returned at 11 (cannot order: write of 7 to k by client 1 at [0,1]; write of 9 to k by \
                     client 2 at [2,11]; read of k by client 3 at [12,15] returned 7)",
                ),
            ),
            (
                "stale read among unrelated operations is shrunk to the three that matter",
                vec![
                    write(1, "k", 7, 0, 1),
                    read(4, "k", Some(7), 1, 2),
                    write(2, "k", 9, 2, 11),
                    read(4, "k", Some(9), 9, 10),
                    write(5, "other", 1, 3, 4),
                    read(3, "k", Some(7), 12, 15),
                    write(2, "k", 10, 16, 17),
                    read(4, "k", Some(10), 18, 19),
                ],
                Expect::Violation(
                    "k",
                    "read of k by client 3 at [12,15] returned 7, but 7 was overwritten by the write of 9 by client 2 \
                     that returned at 11 (cannot order: write of 7 to k by client 1 at [0,1]; write of 9 to k by \
                     client 2 at [2,11]; read of k by client 3 at [12,15] returned 7)",
                ),
            ),
            (
                "read of a value never written",
                vec![write(1, "k", 1, 0, 1), read(2, "k", Some(42), 2, 3)],
                Expect::Violation("k", "read of k by client 2 at [2,3] returned 42, a value never written to k"),
            ),
            (
                "read of a value before its write was invoked",
                vec![read(2, "k", Some(5), 0, 1), write(1, "k", 5, 2, 3)],
                Expect::Violation("k", "returned 5, but 5 was written only later, by the write of 5 to k by client 1"),
            ),
            (
                "two reads see the writes in an order their real-time order forbids",
                vec![
                    write(1, "k", 1, 0, 1),
                    write(1, "k", 2, 2, 10),
                    read(2, "k", Some(2), 3, 4),
                    read(3, "k", Some(1), 5, 6),
                ],
                Expect::Violation("k", "no order of these 4 operations on k"),
            ),
            (
                "reads flip between two concurrent writes",
                vec![
                    write(1, "k", 1, 0, 10),
                    write(2, "k", 2, 0, 10),
                    read(3, "k", Some(1), 1, 2),
                    read(3, "k", Some(2), 3, 4),
                    read(4, "k", Some(1), 5, 6),
                ],
                Expect::Violation("k", "no order of these 5 operations on k"),
            ),
            (
                "failed write whose value is read later happened",
                vec![write(1, "k", 1, 0, 1), failed_write(2, "k", 5, 2), read(3, "k", Some(5), 10, 11)],
                Expect::Ok,
            ),
            (
                "failed write may take effect long after its client gave up",
                vec![
                    write(1, "k", 1, 0, 1),
                    failed_write(2, "k", 5, 2),
                    read(3, "k", Some(1), 20, 21),
                    write(1, "k", 6, 22, 23),
                    read(3, "k", Some(6), 24, 25),
                    read(3, "k", Some(5), 100, 101),
                ],
                Expect::Ok,
            ),
            (
                "failed write never read",
                vec![write(1, "k", 1, 0, 1), failed_write(2, "k", 2, 2), read(1, "k", Some(1), 5, 6)],
                Expect::Ok,
            ),
            (
                "failed write read before it was invoked",
                vec![read(1, "k", Some(5), 0, 1), failed_write(2, "k", 5, 2)],
                Expect::Violation("k", "returned 5, but 5 was written only later"),
            ),
            (
                "failed write cannot take effect twice",
                vec![
                    failed_write(1, "k", 5, 0),
                    read(2, "k", Some(5), 1, 2),
                    write(3, "k", 6, 3, 4),
                    read(2, "k", Some(5), 5, 6),
                ],
                Expect::Violation("k", "no order of these 4 operations on k"),
            ),
            (
                "failed read is dropped whatever it recorded",
                vec![write(1, "k", 1, 0, 1), failed_read(2, "k", 2), read(2, "k", Some(1), 5, 6)],
                Expect::Ok,
            ),
            (
                "read returning absent after a write returned",
                vec![write(1, "k", 5, 0, 1), read(2, "k", None, 2, 3)],
                Expect::Violation(
                    "k",
                    "read of k by client 2 at [2,3] returned absent, but the write of 5 to k by client 1 at [0,1] had \
                     already returned",
                ),
            ),
            (
                "duplicate values: the second write of 1 explains the read",
                vec![
                    write(1, "k", 1, 0, 1),
                    write(1, "k", 2, 2, 3),
                    write(1, "k", 1, 4, 5),
                    read(2, "k", Some(1), 6, 7),
                ],
                Expect::Ok,
            ),
            (
                "duplicate values: a stale read is still caught",
                vec![
                    write(1, "k", 1, 0, 1),
                    write(1, "k", 1, 2, 3),
                    write(1, "k", 2, 4, 5),
                    read(2, "k", Some(1), 6, 7),
                ],
                Expect::Violation("k", "no order of these 4 operations on k"),
            ),
            (
                "keys are independent: a violation on b is reported with b",
                vec![
                    write(1, "a", 1, 0, 1),
                    write(2, "b", 1, 0, 1),
                    read(1, "a", Some(1), 2, 3),
                    write(2, "b", 2, 2, 3),
                    read(3, "b", Some(1), 4, 5),
                    read(3, "a", Some(1), 6, 7),
                ],
                Expect::Violation("b", "read of b by client 3 at [4,5] returned 1, but 1 was overwritten"),
            ),
            (
                "keys are independent: the same value on two keys",
                vec![write(1, "a", 1, 0, 1), read(2, "b", None, 2, 3), read(2, "a", Some(1), 4, 5)],
                Expect::Ok,
            ),
            (
                "malformed: a return before the invocation",
                vec![write(1, "k", 1, 5, 4)],
                Expect::Violation("k", "malformed history"),
            ),
            (
                "malformed: a write answered with a read result",
                vec![Operation {
                    client: 1,
                    input: Input::Write { key: "k".to_string(), value: 1 },
                    output: Some(Output::Read(None)),
                    invoke: 0,
                    ret: Some(1),
                }],
                Expect::Violation("k", "malformed history"),
            ),
        ];
        let mut failures = Vec::new();
        for (name, history, expect) in &cases {
            let outcome = check(history, None);
            let matched = match (expect, &outcome) {
                (Expect::Ok, Outcome::Ok) => true,
                (Expect::Violation(key, text), Outcome::Violation { key: got, explanation }) => {
                    got == key && explanation.contains(text)
                }
                _ => false,
            };
            if !matched {
                failures.push(format!("{name}: got {outcome:?}"));
            }
        }
        assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    }

    #[test]
    fn builder_records_calls_and_answers() {
        let mut history = History::new();
        let first = history.invoke(1, Input::Write { key: "k".to_string(), value: 3 }, 10);
        let second = history.invoke(2, Input::Read { key: "k".to_string() }, 11);
        let lost = history.invoke(3, Input::Write { key: "k".to_string(), value: 4 }, 12);
        history.ret(second, Output::Read(Some(3)), 14);
        history.ret(first, Output::WriteOk, 13);
        assert_eq!(history.operations().len(), 3);
        assert_eq!(history.operations()[0], write(1, "k", 3, 10, 13));
        assert_eq!(history.operations()[1], read(2, "k", Some(3), 11, 14));
        assert_eq!(history.operations()[lost.0], failed_write(3, "k", 4, 12));
        assert_eq!(check(history.operations(), None), Outcome::Ok);
    }

    /// A history of a real sequential register: each call takes effect at a random point inside
    /// its interval, so the history is linearizable by construction. Some calls fail; a failed
    /// write takes effect at a random time after its invocation, or never.
    fn execute(rng: &mut fastrand::Rng, clients: u64, count: usize, keys: &[&str]) -> Vec<Operation> {
        let mut free_at = vec![0u64; clients as usize];
        let mut ops = Vec::with_capacity(count);
        let mut effects = Vec::new();
        let mut next_value = 1;
        for index in 0..count {
            let client = rng.u64(0..clients);
            let invoke = free_at[client as usize] + rng.u64(0..4);
            let at = invoke + rng.u64(0..6);
            let ret = at + rng.u64(0..6);
            free_at[client as usize] = ret + 1;
            let key = keys[rng.usize(..keys.len())].to_string();
            let input = if rng.bool() {
                next_value += 1;
                Input::Write { key, value: next_value }
            } else {
                Input::Read { key }
            };
            let failed = rng.u8(0..100) < 5;
            let effect = if failed { rng.bool().then(|| invoke + rng.u64(0..30)) } else { Some(at) };
            if let Some(at) = effect {
                effects.push((at, index));
            }
            ops.push(Operation { client, input, output: None, invoke, ret: (!failed).then_some(ret) });
        }
        // Two calls that take effect at the same instant both span it, so either order is real.
        effects.sort_unstable();
        let mut state: BTreeMap<String, u64> = BTreeMap::new();
        for (_, index) in effects {
            let op = &mut ops[index];
            let output = match &op.input {
                Input::Write { key, value } => {
                    state.insert(key.clone(), *value);
                    Output::WriteOk
                }
                Input::Read { key } => Output::Read(state.get(key).copied()),
            };
            if op.ret.is_some() {
                op.output = Some(output);
            }
        }
        ops
    }

    /// Changes what one successful read returned: to another value written to its key, to absent,
    /// or to a value never written. Returns the key, or `None` if the history has no such read.
    fn corrupt(rng: &mut fastrand::Rng, ops: &mut [Operation]) -> Option<String> {
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].output, Some(Output::Read(_))) && ops[i].ret.is_some())
            .collect();
        if reads.is_empty() {
            return None;
        }
        let target = reads[rng.usize(..reads.len())];
        let key = ops[target].input.key().to_string();
        let written: Vec<u64> = ops
            .iter()
            .filter_map(|op| match &op.input {
                Input::Write { key: k, value } if *k == key => Some(*value),
                _ => None,
            })
            .collect();
        let Some(Output::Read(old)) = ops[target].output else { return None };
        let new = loop {
            let candidate = match rng.u8(0..3) {
                0 if !written.is_empty() => Some(written[rng.usize(..written.len())]),
                1 => None,
                _ => Some(u64::MAX - rng.u64(0..1000)),
            };
            if candidate != old {
                break candidate;
            }
        };
        ops[target].output = Some(Output::Read(new));
        Some(key)
    }

    #[test]
    fn random_histories_pass_and_corrupted_ones_are_caught() {
        let mut rng = fastrand::Rng::with_seed(0x7e11);
        let (mut corrupted, mut caught, mut still_linearizable) = (0, 0, 0);
        for round in 0..200 {
            let mut history = execute(&mut rng, 1 + round % 5, 40, &["a", "b", "c"]);
            assert_eq!(check(&history, None), Outcome::Ok, "round {round}: {history:#?}");
            let Some(key) = corrupt(&mut rng, &mut history) else { continue };
            corrupted += 1;
            match check(&history, None) {
                Outcome::Violation { key: got, .. } => {
                    assert_eq!(got, key, "round {round}: the violation is on the corrupted key");
                    caught += 1;
                }
                Outcome::Ok => still_linearizable += 1,
                Outcome::Unknown { .. } => panic!("round {round}: no budget was set"),
            }
        }
        eprintln!("corrupted {corrupted}, caught {caught}, still linearizable {still_linearizable}");
        assert!(corrupted >= 190, "only {corrupted} of 200 histories had a read to corrupt");
        assert!(caught * 100 >= corrupted * 95, "caught {caught} of {corrupted} corrupted histories");
    }

    /// Tries every order of every subset of the failed writes: slow, but obviously right.
    fn brute_force(history: &[Operation]) -> bool {
        let ops: Vec<&Operation> = history
            .iter()
            .filter(|op| matches!(op.input, Input::Write { .. }) || (op.ret.is_some() && op.output.is_some()))
            .collect();
        fn ret(op: &Operation) -> u64 {
            if op.output.is_some() { op.ret.unwrap_or(u64::MAX) } else { u64::MAX }
        }
        fn extend(ops: &[&Operation], placed: &mut Vec<bool>, state: Option<u64>) -> bool {
            let done = ops.iter().zip(placed.iter()).all(|(op, &placed)| placed || ret(op) == u64::MAX);
            if done {
                return true;
            }
            for i in 0..ops.len() {
                // Next may be any call not yet placed that no unplaced call precedes in real time.
                if placed[i] || (0..ops.len()).any(|j| !placed[j] && j != i && ret(ops[j]) < ops[i].invoke) {
                    continue;
                }
                let after = match (&ops[i].input, ops[i].output) {
                    (Input::Write { value, .. }, _) => Some(*value),
                    (Input::Read { .. }, Some(Output::Read(seen))) if seen == state => state,
                    _ => continue,
                };
                placed[i] = true;
                if extend(ops, placed, after) {
                    return true;
                }
                placed[i] = false;
            }
            false
        }
        extend(&ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_histories() {
        let mut rng = fastrand::Rng::with_seed(0xb207e);
        let (mut agreed_ok, mut agreed_violation) = (0, 0);
        for round in 0..600 {
            let mut history = execute(&mut rng, 3, 7, &["k"]);
            if rng.bool() {
                corrupt(&mut rng, &mut history);
            }
            let expected = brute_force(&history);
            match check(&history, None) {
                Outcome::Ok if expected => agreed_ok += 1,
                Outcome::Violation { .. } if !expected => agreed_violation += 1,
                outcome => panic!("round {round}: brute force says {expected}, checker {outcome:?}: {history:#?}"),
            }
        }
        eprintln!("agreed on {agreed_ok} linearizable and {agreed_violation} violating histories");
        assert!(agreed_ok >= 100 && agreed_violation >= 100, "both verdicts must be exercised");
    }

    #[test]
    fn large_single_key_history() {
        let mut rng = fastrand::Rng::with_seed(2000);
        let mut history = execute(&mut rng, 5, 2000, &["k"]);
        let started = Instant::now();
        let outcome = check(&history, None);
        eprintln!("checked 2000 operations of 5 clients on one key in {:?}", started.elapsed());
        assert_eq!(outcome, Outcome::Ok);

        assert_eq!(check(&history, Some(Duration::ZERO)), Outcome::Unknown { key: "k".to_string() });

        // Make the last read return the first value written, which was overwritten long before.
        let first = history.iter().find_map(|op| match (&op.input, op.output) {
            (Input::Write { value, .. }, Some(Output::WriteOk)) => Some(*value),
            _ => None,
        });
        let last = history.iter_mut().rev().find(|op| matches!(op.output, Some(Output::Read(_))));
        last.expect("the history has reads").output = Some(Output::Read(first));
        let started = Instant::now();
        let outcome = check(&history, None);
        eprintln!("found and explained a violation in {:?}: {outcome:?}", started.elapsed());
        assert!(matches!(outcome, Outcome::Violation { .. }), "{outcome:?}");
    }
}
