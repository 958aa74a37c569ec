//! The dependency graph of a workflow's steps: an execution order, or a
//! cycle that rules one out.
//!
//! Steps are numbered by declaration; `depends_on[i]` lists the steps that
//! step `i` needs to have run first.

use std::collections::BTreeSet;

/// A topological order of the steps. Among the steps that are ready at any
/// point, the one declared first runs first, so the order is deterministic
/// and, for a workflow already written in a runnable order, is exactly the
/// declaration order.
///
/// Dependencies on indices outside `0..depends_on.len()` are ignored (the
/// caller validates names before building the graph).
///
/// On failure, returns the steps of one cycle (see [`find_cycle`]).
pub(crate) fn execution_order(depends_on: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = depends_on.len();
    let mut waiting_on = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (step, deps) in depends_on.iter().enumerate() {
        // Deduplicate so that a dependency listed twice is counted once.
        let deps: BTreeSet<usize> = deps.iter().copied().filter(|&d| d < n).collect();
        waiting_on[step] = deps.len();
        for d in deps {
            dependents[d].push(step);
        }
    }

    // A sorted set of ready steps: taking its first element is what makes
    // "declaration order among the ready" hold.
    let mut ready: BTreeSet<usize> = (0..n).filter(|&s| waiting_on[s] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(step) = ready.pop_first() {
        order.push(step);
        for &next in &dependents[step] {
            waiting_on[next] -= 1;
            if waiting_on[next] == 0 {
                ready.insert(next);
            }
        }
    }

    if order.len() == n {
        Ok(order)
    } else {
        let mut done = vec![false; n];
        for &s in &order {
            done[s] = true;
        }
        Err(find_cycle(depends_on, &done))
    }
}

/// One cycle among the steps not `done`, listed so that each step needs
/// the one before it (and the first needs the last), starting from the
/// lowest-numbered step of the cycle.
///
/// Every step left over by [`execution_order`] still waits on another
/// left-over step, so following "a left-over dependency" from any of them
/// must eventually revisit a step; the revisited stretch is a cycle.
fn find_cycle(depends_on: &[Vec<usize>], done: &[bool]) -> Vec<usize> {
    let n = depends_on.len();
    let Some(start) = (0..n).find(|&s| !done[s]) else {
        return Vec::new();
    };
    let mut position_in_walk: Vec<Option<usize>> = vec![None; n];
    let mut walk = Vec::new();
    let mut current = start;
    loop {
        if let Some(at) = position_in_walk[current] {
            let mut cycle: Vec<usize> = walk[at..].to_vec();
            // The walk went from a step to what it needs; report the
            // direction the data flows instead.
            cycle.reverse();
            if let Some(lowest) = cycle.iter().enumerate().min_by_key(|&(_, &s)| s).map(|(i, _)| i) {
                cycle.rotate_left(lowest);
            }
            return cycle;
        }
        position_in_walk[current] = Some(walk.len());
        walk.push(current);
        let next = depends_on[current].iter().copied().filter(|&d| d < n && !done[d]).min();
        match next {
            Some(next) => current = next,
            // Cannot happen for steps left over by a topological sort;
            // return what was walked rather than panic.
            None => return walk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declaration_order_when_already_runnable() {
        let deps = vec![vec![], vec![0], vec![1]];
        assert_eq!(execution_order(&deps), Ok(vec![0, 1, 2]));
    }

    #[test]
    fn ready_steps_run_in_declaration_order() {
        // 0 needs 2; 1 and 2 are free: 1 runs first (declared before 2),
        // then 2, then 0 once 2 is done.
        let deps = vec![vec![2], vec![], vec![]];
        assert_eq!(execution_order(&deps), Ok(vec![1, 2, 0]));
        // A diamond declared backwards.
        let deps = vec![vec![1, 2], vec![3], vec![3], vec![]];
        assert_eq!(execution_order(&deps), Ok(vec![3, 1, 2, 0]));
    }

    #[test]
    fn duplicate_and_out_of_range_dependencies_are_harmless() {
        let deps = vec![vec![], vec![0, 0, 9]];
        assert_eq!(execution_order(&deps), Ok(vec![0, 1]));
    }

    #[test]
    fn two_step_cycle() {
        let deps = vec![vec![1], vec![0]];
        assert_eq!(execution_order(&deps), Err(vec![0, 1]));
    }

    #[test]
    fn cycle_is_reported_in_data_flow_order_without_the_steps_behind_it() {
        // 0 is free; 1 needs 3, 2 needs 1, 3 needs 2 (so 1 -> 2 -> 3 -> 1);
        // 4 needs 3 and is stuck behind the cycle but is not part of it.
        let deps = vec![vec![], vec![3, 0], vec![1], vec![2], vec![3]];
        assert_eq!(execution_order(&deps), Err(vec![1, 2, 3]));
        // Reached through a step outside the cycle first.
        let deps = vec![vec![2], vec![2], vec![1]];
        assert_eq!(execution_order(&deps), Err(vec![1, 2]));
    }

    #[test]
    fn self_loop() {
        assert_eq!(execution_order(&[vec![0]]), Err(vec![0]));
    }

    #[test]
    fn empty_graph() {
        assert_eq!(execution_order(&[]), Ok(vec![]));
    }
}
