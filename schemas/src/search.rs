//! What the seeded searches of the tests share (the proxy's delivery queue, the prepaid
//! ledger): a failing sequence shrunk to a short one, and the counts read from the environment.

/// Where a sequence failed (the index of the step) and why.
pub type Failure = (usize, String);

/// Removes chunks, then single steps, of `ops` while `run` still fails; answers the shortest
/// sequence found and its failure. `failure` is what `run(&ops)` answered.
pub fn shrink<T: Clone>(
    mut ops: Vec<T>,
    mut failure: Failure,
    run: impl Fn(&[T]) -> Result<(), Failure>,
) -> (Vec<T>, Failure) {
    ops.truncate(failure.0 + 1);
    let mut chunk = ops.len() / 2;
    while chunk >= 1 {
        let mut i = 0;
        while i < ops.len() {
            let mut shorter = ops.clone();
            shorter.drain(i..(i + chunk).min(ops.len()));
            match run(&shorter) {
                Err(f) => {
                    shorter.truncate(f.0 + 1);
                    ops = shorter;
                    failure = f;
                }
                Ok(()) => i += chunk,
            }
        }
        chunk /= 2;
    }
    (ops, failure)
}

/// A sequence one step per line, numbered, for a failure's message.
pub fn listing<T: std::fmt::Debug>(ops: &[T]) -> String {
    let lines: Vec<String> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| format!("  {i}: {op:?}"))
        .collect();
    lines.join("\n")
}

/// The number in the environment variable `name`, else `default`; anything else is a mistake
/// of whoever set it.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_shrunk_to_the_steps_that_cause_it() {
        // Fails once a 3 follows a 7, anywhere later.
        let run = |ops: &[u32]| -> Result<(), Failure> {
            let seven = ops.iter().position(|&o| o == 7);
            match seven.and_then(|s| ops[s..].iter().position(|&o| o == 3).map(|t| s + t)) {
                Some(at) => Err((at, "3 after 7".into())),
                None => Ok(()),
            }
        };
        let ops = vec![1, 7, 2, 2, 5, 3, 9, 9];
        let failure = run(&ops).unwrap_err();
        assert_eq!(
            shrink(ops, failure, run),
            (vec![7, 3], (1, "3 after 7".into()))
        );
    }
}
