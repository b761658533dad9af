"""Batched dense correspondence and the injection plan against brute-force loops."""

import torch
import torch.nn.functional as F

from consistory.method.correspondence import (
    MASKED_DISTANCE,
    gaussian_kernel,
    inject_features,
    nearest_sources,
    plan_injection,
    smooth_features,
)


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_nearest_sources_equals_a_brute_force_loop():
    b, a, n, c = 4, 2, 24, 8
    targets, sources = _unit(b, n, c, seed=0), _unit(a, n, c, seed=1)
    source_masks = torch.rand(a, n, generator=torch.Generator().manual_seed(2)) > 0.4
    own = torch.tensor([0, 1, -1, -1])  # the first two targets are the anchors themselves
    nn_dist, nn_map = nearest_sources(targets, sources, source_masks, own, chunk=3)
    for i in range(b):
        for j in range(a):
            if own[i] == j:
                assert torch.isinf(nn_dist[i, j]).all()
                continue
            for p in range(n):
                best, arg = float("inf"), -1
                for q in range(n):
                    d = 1.0 - float(targets[i, p] @ sources[j, q]) if source_masks[j, q] else MASKED_DISTANCE
                    if d < best:
                        best, arg = d, q
                assert abs(float(nn_dist[i, j, p]) - best) < 1e-5
                assert int(nn_map[i, j, p]) == arg


def test_masked_out_source_tokens_are_never_chosen():
    b, a, n, c = 3, 2, 32, 6
    targets, sources = _unit(b, n, c, seed=3), _unit(a, n, c, seed=4)
    source_masks = torch.zeros(a, n, dtype=torch.bool)
    source_masks[0, :5] = True
    source_masks[1, 20:23] = True
    # Make the masked-out tokens the perfect matches: they must still not be chosen.
    sources[0, 10:] = targets[0, : n - 10]
    _, nn_map = nearest_sources(targets, sources, source_masks, torch.full((b,), -1))
    assert source_masks[0][nn_map[:, 0]].all()
    assert source_masks[1][nn_map[:, 1]].all()


def test_plan_points_into_the_bank_of_masked_source_tokens():
    b, a, n, c = 3, 2, 16, 5
    targets, sources = _unit(b, n, c, seed=5), _unit(a, n, c, seed=6)
    source_masks = torch.rand(a, n, generator=torch.Generator().manual_seed(7)) > 0.5
    target_masks = torch.ones(b, n, dtype=torch.bool)
    target_masks[:, :4] = False
    nn_dist, nn_map = nearest_sources(targets, sources, source_masks, torch.tensor([0, 1, -1]))
    plan = plan_injection(nn_dist, nn_map, target_masks, source_masks)
    bank_sources = [(j, q) for j in range(a) for q in range(n) if source_masks[j, q]]
    assert plan.targets.any()
    assert not plan.targets[:, :4].any()  # only tokens inside the subject mask
    for i, p in plan.targets.nonzero().tolist():
        j, q = bank_sources[int(plan.bank_index[i, p])]
        best_j = int(nn_dist[i, :, p].argmin())
        assert (j, q) == (best_j, int(nn_map[i, best_j, p]))
        assert i >= a or j != i  # an anchor never takes from itself


def test_inject_features_blends_only_targets():
    out = torch.zeros(1, 3, 2)
    bank = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    from consistory.method.correspondence import InjectionPlan

    plan = InjectionPlan(bank_index=torch.tensor([[1, 0, 0]]), targets=torch.tensor([[True, False, True]]))
    result = inject_features(out, bank, plan, alpha=0.8)
    assert torch.allclose(result[0], torch.tensor([[1.6, 1.6], [0.0, 0.0], [0.8, 0.8]]))


def test_smoothing_is_a_normalised_3x3_gaussian_with_zero_padding():
    k = gaussian_kernel(3, 1.0)
    assert abs(float(k.sum()) - 1.0) < 1e-6 and k[1, 1] == k.max()
    x = torch.zeros(1, 2, 5, 5)
    x[0, :, 2, 2] = 1.0
    y = smooth_features(x)
    assert torch.allclose(y[0, 0, 1:4, 1:4], k)
    corner = smooth_features(torch.ones(1, 1, 4, 4))[0, 0, 0, 0]
    assert abs(float(corner) - float(k[1:, 1:].sum())) < 1e-6  # zero padding, not reflection
