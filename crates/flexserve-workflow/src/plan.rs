//! The residency plan: which models to load, keep, evict and unload as a
//! workflow runs, for a scheduler that holds models in limited secure
//! memory.
//!
//! The whole future is known (the execution order is fixed before the
//! first step runs), so the scheduler can follow Belady's rule: when
//! memory is short, give up the model whose next use is furthest away.
//! This module only derives that information; acting on it is the
//! runner's job.

/// What the scheduler should know at each position of the execution
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidencyPlan {
    /// One entry per position of the execution order, in that order.
    pub steps: Vec<StepPlan>,
}

/// The plan for one position of the execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// The step run at this position (an index into the workflow's steps).
    pub step: usize,
    /// The model that step runs (an index into the workflow's models).
    pub model: usize,
    /// Models whose last use is this position: unload them once this step
    /// is done, since nothing later needs them. Sorted.
    pub unload_after: Vec<usize>,
    /// The model the next position runs, if it differs from this one's:
    /// it can be loaded while this step runs.
    pub prefetch: Option<usize>,
    /// If memory runs short while this step runs, the other models still
    /// needed later, in the order to give them up: furthest next use first
    /// (ties: lower index first). Never this step's model, and never a
    /// model with no later use (those are unloaded, not evicted).
    pub eviction_order: Vec<usize>,
}

/// The next position after `position` (strictly) whose step runs `model`,
/// given the model of each position in execution order.
pub fn next_use(order_models: &[usize], position: usize, model: usize) -> Option<usize> {
    let start = position.checked_add(1)?;
    order_models.get(start..)?.iter().position(|&m| m == model).map(|offset| start + offset)
}

/// Builds the plan from the execution order (step indices) and each
/// step's model (indexed by step). A step index with no model entry is
/// skipped rather than trusted.
pub(crate) fn residency_plan(order: &[usize], step_models: &[usize]) -> ResidencyPlan {
    let placed: Vec<(usize, usize)> =
        order.iter().filter_map(|&step| step_models.get(step).map(|&model| (step, model))).collect();
    let order_models: Vec<usize> = placed.iter().map(|&(_, model)| model).collect();
    let mut distinct: Vec<usize> = order_models.clone();
    distinct.sort_unstable();
    distinct.dedup();

    let steps = placed
        .iter()
        .enumerate()
        .map(|(position, &(step, model))| {
            let unload_after =
                distinct.iter().copied().filter(|&m| last_use(&order_models, m) == Some(position)).collect();
            let prefetch = order_models.get(position + 1).copied().filter(|&next| next != model);
            let mut later: Vec<(usize, usize)> = distinct
                .iter()
                .copied()
                .filter(|&m| m != model)
                .filter_map(|m| next_use(&order_models, position, m).map(|at| (at, m)))
                .collect();
            // Furthest next use first; equal uses by lower model index.
            later.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let eviction_order = later.into_iter().map(|(_, m)| m).collect();
            StepPlan { step, model, unload_after, prefetch, eviction_order }
        })
        .collect();
    ResidencyPlan { steps }
}

/// The last position that runs `model`.
fn last_use(order_models: &[usize], model: usize) -> Option<usize> {
    order_models.iter().rposition(|&m| m == model)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;

    #[test]
    fn next_use_looks_strictly_ahead() {
        let models = [A, B, A, C, B];
        assert_eq!(next_use(&models, 0, A), Some(2));
        assert_eq!(next_use(&models, 2, A), None);
        assert_eq!(next_use(&models, 0, B), Some(1));
        assert_eq!(next_use(&models, 1, B), Some(4));
        assert_eq!(next_use(&models, 4, B), None);
        assert_eq!(next_use(&models, 9, B), None);
        assert_eq!(next_use(&models, usize::MAX, B), None);
        assert_eq!(next_use(&[], 0, A), None);
    }

    #[test]
    fn plan_for_a_b_a_c_b() {
        // Steps declared in order, so position == step index.
        let order = [0, 1, 2, 3, 4];
        let models = [A, B, A, C, B];
        let plan = residency_plan(&order, &models);
        let expected = [
            // 0 runs A. Next uses: B at 1, C at 3; C is further, so C goes first.
            StepPlan { step: 0, model: A, unload_after: vec![], prefetch: Some(B), eviction_order: vec![C, B] },
            // 1 runs B. A next at 2, C at 3, B again at 4 (but B is running).
            StepPlan { step: 1, model: B, unload_after: vec![], prefetch: Some(A), eviction_order: vec![C, A] },
            // 2 runs A for the last time; B is needed at 4, C at 3.
            StepPlan { step: 2, model: A, unload_after: vec![A], prefetch: Some(C), eviction_order: vec![B, C] },
            // 3 runs C for the last time; only B is still needed; A is gone.
            StepPlan { step: 3, model: C, unload_after: vec![C], prefetch: Some(B), eviction_order: vec![B] },
            // 4 runs B for the last time; nothing follows.
            StepPlan { step: 4, model: B, unload_after: vec![B], prefetch: None, eviction_order: vec![] },
        ];
        assert_eq!(plan.steps, expected);
    }

    #[test]
    fn same_model_back_to_back_is_not_prefetched() {
        let plan = residency_plan(&[0, 1], &[A, A]);
        assert_eq!(plan.steps[0].prefetch, None);
        assert_eq!(plan.steps[0].unload_after, Vec::<usize>::new());
        assert_eq!(plan.steps[1].unload_after, vec![A]);
    }

    #[test]
    fn follows_the_execution_order_not_declaration() {
        // Step 1 runs first.
        let plan = residency_plan(&[1, 0], &[A, B]);
        assert_eq!(plan.steps[0].step, 1);
        assert_eq!(plan.steps[0].model, B);
        assert_eq!(plan.steps[0].prefetch, Some(A));
        assert_eq!(plan.steps[0].unload_after, vec![B]);
        assert_eq!(plan.steps[0].eviction_order, vec![A]);
    }

    #[test]
    fn unknown_steps_are_skipped_not_trusted() {
        let plan = residency_plan(&[0, 7], &[A]);
        assert_eq!(plan.steps.len(), 1);
    }
}
