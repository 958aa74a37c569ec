//! Models sharing a budget too small for all of them (a workflow's models):
//! a request that needs more than the budget has left gives up layers of the
//! models its scheduler named (`Evict`, last layers first) instead of
//! failing, their granules serve it without being released and protected
//! again, and an evicted model reloads what it lost with the same tokens.
//! Each test starts a real `flexserve-secure` process on the real model.

mod common;

use common::{generate, options, plain_generate, sealed};
use flexserve_normal::{MemoryBudget, NormalError, OpenedModel, SecureWorld, SecureWorldOptions};
use flexserve_protocol::ModelStatus;

/// Layers of the real model.
const LAYERS: u32 = 30;

fn model_status(world: &mut SecureWorld, model: &OpenedModel) -> ModelStatus {
    let st = world.status().unwrap();
    st.models.into_iter().find(|m| m.model == model.id).unwrap_or_else(|| panic!("model {} not in status", model.id))
}

#[test]
fn a_request_short_of_budget_evicts_the_named_models_layers_and_reuses_their_granules() {
    let s = sealed();
    let prompt = "The capital of France is";
    let expected = plain_generate(prompt, 8);
    // Room for one copy of the model's weights (94 MiB) and its KV cache, not for two.
    let budget = 160u64 << 20;
    let opts = SecureWorldOptions { budget: MemoryBudget::Bytes(budget), ..options(&s) };
    let mut world = SecureWorld::spawn(&opts).unwrap();
    let budget_granules = budget / world.info().granule_size;
    // Two models in one session: the same file opened twice stands for a workflow's two steps.
    let (first, _) = world.open_model_header(&s.model).unwrap();
    let (second, _) = world.open_model_header(&s.model).unwrap();
    assert_eq!(generate(&mut world, &first, prompt, 8), expected);
    assert_eq!(model_status(&mut world, &first).resident_layers, LAYERS);

    // Without an eviction order the second model does not fit: a budget
    // error, and the first model keeps every layer.
    let mut text = String::new();
    let refused = world.generate(&second, common::request(&second, prompt, 8), |t| text.push_str(t));
    assert!(matches!(refused, Err(NormalError::Budget(_))), "{refused:?}");
    assert!(text.is_empty());
    assert_eq!(model_status(&mut world, &first).resident_layers, LAYERS);

    // Named first to give up, the first model loses its last layers (its
    // base last), as many as the second needs; nothing goes over the budget.
    world.set_eviction_order(vec![first.id]);
    let granted_before = world.status().unwrap().granted;
    assert_eq!(generate(&mut world, &second, prompt, 8), expected);
    let status = world.status().unwrap();
    assert!(u64::from(status.granted) <= budget_granules, "{} granted of {budget_granules}", status.granted);
    assert_eq!(status.granted, granted_before, "the evicted granules served the request: nothing more was granted");
    let first_left = model_status(&mut world, &first).resident_layers;
    assert!(first_left < LAYERS, "the first model kept all its layers");
    assert_eq!(model_status(&mut world, &second).resident_layers, LAYERS);

    // The other way round: the first model reloads what it lost, the same tokens.
    world.set_eviction_order(vec![second.id]);
    assert_eq!(generate(&mut world, &first, prompt, 8), expected);
    assert_eq!(model_status(&mut world, &first).resident_layers, LAYERS);
    assert!(model_status(&mut world, &second).resident_layers < LAYERS);

    // Evicting by hand: a model's layers go, its granules stay granted and free.
    let before = world.status().unwrap();
    let (freed, groups, _) = world.evict(first.id, 8).unwrap();
    let after = world.status().unwrap();
    assert!(freed >= 8 && groups >= 1, "freed {freed} in {groups} groups");
    assert_eq!(after.granted, before.granted);
    assert_eq!(after.in_use, before.in_use - freed);
    // Unloading scrubs the rest of it back into the free pool.
    world.unload(&first).unwrap();
    let unloaded = world.status().unwrap();
    assert_eq!(unloaded.granted, before.granted);
    assert!(unloaded.models.iter().all(|m| m.model != first.id));
    assert!(world.evict(first.id, 1).is_err(), "an unloaded model cannot be evicted");
    world.shutdown().unwrap();
}
