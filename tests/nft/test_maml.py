import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from patronus.models.components import DecoderHead
from patronus.models.tiny import build_vae
from patronus.nft.lora import LoRAView
from patronus.nft.maml import (
    _accumulate_gradient,
    implicit_gradient,
    nft_surrogate,
    query_weights,
    simulate_first_order,
    simulate_second_order,
)
from patronus.nft.space import AttackSpaceConfig, SimulatedAttack, sample_attack
from tests.attacks.test_unet import _norm
from tests.conftest import MINI_CONFIG


def _setup(n=12):
    """A decoder head, an attacker loss (reconstruct x from z) and a query loss (refuse zq)."""
    torch.manual_seed(0)
    head = DecoderHead(build_vae(MINI_CONFIG))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 4, 8, 8, generator=g)
    x = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    zq = torch.randn(6, 4, 8, 8, generator=g)

    def make_inner(batch_size):
        def inner(params, gen):
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            return F.mse_loss(functional_call(head, params, (z[idx],)), x[idx])
        return inner

    def query(params):
        return F.mse_loss(functional_call(head, params, (zq,)), torch.full((6, 3, 32, 32), -1.0))

    return head, z, x, make_inner, query


def test_sampled_attacks_cover_the_space():
    space = AttackSpaceConfig()
    rng = np.random.default_rng(0)
    attacks = [sample_attack(rng, space) for _ in range(400)]
    assert {a.optimizer for a in attacks} == {"adam", "adamw", "sgd"}
    assert sum(a.optimizer in ("adam", "adamw") for a in attacks) > 0.6 * len(attacks)  # mostly Adam
    lrs = np.log10([a.lr for a in attacks])
    assert -5 <= lrs.min() < -4.8 and -3.2 < lrs.max() <= -3  # log-uniform over 1e-5..1e-3
    assert abs(np.mean(lrs) + 4) < 0.1
    assert {a.objective for a in attacks} == {"image", "feature"} and {a.update for a in attacks} == {"full", "lora"}
    assert {a.lora_rank for a in attacks} == {4, 64}
    assert all(8 <= a.batch_size <= 32 and 10 <= a.steps <= 100 for a in attacks)
    assert max(a.steps for a in attacks) >= 95  # horizons reach the real attacks' first checkpoint
    again = np.random.default_rng(0)
    assert attacks == [sample_attack(again, space) for _ in range(400)]


def test_late_queries_weigh_more():
    assert query_weights(3, "late") == [1 / 6, 2 / 6, 3 / 6]
    assert query_weights(2, "uniform") == [0.5, 0.5]


@pytest.mark.parametrize("bad,needle", [
    (dict(optimizers=(("lion", 1.0),)), "attacks.optimizers"),
    (dict(lr_range=(1e-3, 1e-5)), "attacks.lr_range"),
    (dict(query_weighting="early"), "attacks.query_weighting"),
    (dict(inner_steps=(5, 2)), "attacks.inner_steps"),
    (dict(updates=("full", "dora")), "attacks.updates"),
])
def test_bad_attack_spaces_are_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        AttackSpaceConfig(**bad)


def test_first_order_leaves_the_module_untouched_and_matches_a_manual_attack():
    head, z, x, make_inner, query = _setup()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    attack = SimulatedAttack("sgd", 1e-2, 4, 6, "image", "full", 4)
    grads, q = simulate_first_order(head, attack, make_inner(4), query, queries=2,
                                    generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert set(grads) == {n for n, _ in head.named_parameters()}

    # The same attack by hand on a deep copy: the final query gradient must match.
    twin = copy.deepcopy(head)
    opt = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    manual = {k: torch.zeros_like(v) for k, v in twin.named_parameters()}
    for step in range(1, 7):
        idx = torch.randint(0, 12, (4,), generator=g)
        loss = F.mse_loss(twin(z[idx]), x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in attack.query_steps(2):
            params = dict(twin.named_parameters())  # the query closure runs them through `head`'s structure
            for (k, _), gq in zip(params.items(), torch.autograd.grad(query(params), list(params.values()))):
                manual[k] += gq
    for k in grads:
        torch.testing.assert_close(grads[k], manual[k] / len(attack.query_steps(2)), rtol=1e-4, atol=1e-6)


def test_the_query_gradient_is_added_parameter_by_parameter_with_the_same_numbers():
    """The streamed sum (one parameter's gradient alive at a time) is bit-identical to
    torch.autograd.grad followed by a loop, and refuses an unused parameter as autograd.grad does."""
    head, _, _, _, query = _setup()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in head.named_parameters()}
    start = {k: torch.randn_like(v) for k, v in params.items()}
    expected = {k: v.clone() for k, v in start.items()}
    for (k, _), g in zip(params.items(), torch.autograd.grad(query(params), list(params.values()))):
        expected[k] += 0.37 * g
    _accumulate_gradient(query(params), params, start, 0.37)
    assert all(torch.equal(start[k], expected[k]) for k in params)
    assert all(p.grad is None for p in params.values())  # nothing left behind on the leaves
    extra = params | {"unused": torch.zeros(3, requires_grad=True)}
    with pytest.raises(RuntimeError, match="does not depend on 1 parameters"):
        _accumulate_gradient(query(params), extra, start | {"unused": torch.zeros(3)}, 1.0)


@pytest.mark.parametrize("update", ["full", "lora"])
def test_an_offset_starts_the_attack_from_the_moved_weights(update):
    head, z, x, make_inner, query = _setup()
    g = torch.Generator().manual_seed(3)
    offset = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in head.named_parameters()}
    moved = copy.deepcopy(head)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p += offset[n]
    attack = SimulatedAttack("adam", 1e-3, 4, 3, "image", update, 4)
    grads, q = simulate_first_order(head, attack, make_inner(4), query, queries=1,
                                    generator=torch.Generator().manual_seed(1), offset=offset)
    want, q_want = simulate_first_order(moved, attack, make_inner(4), query, queries=1,
                                        generator=torch.Generator().manual_seed(1))
    assert q == pytest.approx(q_want, rel=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-4, atol=1e-7)
    plain, q_plain = simulate_first_order(head, attack, make_inner(4), query, queries=1,
                                          generator=torch.Generator().manual_seed(1))
    assert q_plain != pytest.approx(q, rel=1e-3)  # the offset mattered


def test_implicit_gradient_solves_the_proximal_system_on_a_quadratic():
    # L_att = sum c_i (w_i - t_i)^2 / 2: H = diag(c), so (I + alpha H)^-1 g = g / (1 + alpha c).
    c, target = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, -1.0, 2.0])

    def inner(params, gen):
        return 0.5 * (c * (params["w"] - target) ** 2).sum()

    g = torch.tensor([1.0, -2.0, 3.0])
    v, lam = implicit_gradient({"w": g}, {"w": torch.zeros(3)}, inner, batch_seed=0, alpha=0.5, iterations=40)
    torch.testing.assert_close(v["w"], g / (1 + 0.5 * c))
    assert lam == pytest.approx(4.0, rel=0.1)  # power iteration finds the largest curvature


def test_implicit_nft_goes_through_the_simulated_attack():
    head, z, x, make_inner, query = _setup()
    attack = SimulatedAttack("adam", 1e-3, 4, 3, "image", "full", 4)
    plain, _ = simulate_first_order(head, attack, make_inner(4), query, queries=1,
                                    generator=torch.Generator().manual_seed(1))
    damped, _ = simulate_first_order(head, attack, make_inner(4), query, queries=1,
                                     generator=torch.Generator().manual_seed(1), implicit=(1.0, 3))
    assert set(damped) == set(plain)
    assert any(not torch.allclose(damped[k], plain[k]) for k in plain)


def test_lora_view_starts_at_the_base_weights_and_learns():
    head, z, x, make_inner, query = _setup()
    base = {n: p.detach() for n, p in head.named_parameters()}
    lora = LoRAView(base, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(lora.effective()[k], base[k]) for k in base)
    attack = SimulatedAttack("adam", 1e-2, 4, 5, "feature", "lora", 2)
    grads, q = simulate_first_order(head, attack, make_inner(4), query, queries=1,
                                    generator=torch.Generator().manual_seed(0))
    assert np.isfinite(q) and any(g.abs().sum() > 0 for g in grads.values())


def test_second_order_differentiates_through_the_updates():
    head, z, x, make_inner, query = _setup()
    attack = SimulatedAttack("sgd", 1e-2, 4, 2, "image", "full", 4)
    q = simulate_second_order(head, attack, make_inner(4), query, torch.Generator().manual_seed(0))
    q.backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="full-weight sgd"):
        simulate_second_order(head, SimulatedAttack("adam", 1e-2, 4, 2, "image", "full", 4), make_inner(4), query,
                              torch.Generator().manual_seed(0))


def test_the_surrogate_term_carries_the_nft_gradient_into_backward():
    head, z, x, make_inner, query = _setup()
    nft = {n: torch.full_like(p, 2.0) for n, p in head.named_parameters()}
    (0.25 * nft_surrogate(head, nft) + query(dict(head.named_parameters()))).backward()
    alone = torch.autograd.grad(query(dict(head.named_parameters())), list(head.parameters()))
    for p, g in zip(head.parameters(), alone):
        torch.testing.assert_close(p.grad, g + 0.5)


def test_gradient_checkpointing_recomputes_with_the_attackers_weights(monkeypatch):
    """diffusers' checkpointing recomputes a block in the backward pass; under `functional_call`
    that must be with the weights the forward pass used (the attacker's), not the module's own."""
    import patronus.nft.maml as maml

    attack = SimulatedAttack("adam", 1e-2, 4, 4, "image", "full", 4)
    head, _, _, make_inner, query = _setup()
    plain, q_plain = simulate_first_order(head, attack, make_inner(4), query, 2, torch.Generator().manual_seed(1))
    recomputed = []
    monkeypatch.setattr(maml, "checkpoint", lambda *a, **k: recomputed.append(1) or torch.utils.checkpoint.checkpoint(
        *a, **k))
    head.decoder.gradient_checkpointing = True  # as diffusers' enable_gradient_checkpointing sets it
    head.decoder._gradient_checkpointing_func = lambda m, *a: torch.utils.checkpoint.checkpoint(m, *a,
                                                                                                use_reentrant=False)
    ckpt, q_ckpt = simulate_first_order(head, attack, make_inner(4), query, 2, torch.Generator().manual_seed(1))
    assert recomputed and q_ckpt == pytest.approx(q_plain, rel=1e-5)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-7)


def test_under_autocast_every_inner_step_sees_the_updated_weights():
    """Autocast caches a weight's 16-bit copy for its whole region; the attacker's optimizer steps
    in place, so without clearing the cache every inner step would run on the starting weights."""
    attack = SimulatedAttack("sgd", 5e-2, 4, 5, "image", "full", 4)
    head, _, _, make_inner, query = _setup()

    def own_region(fn):  # each call in its own autocast region: a fresh cache every time
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    fresh, q_fresh = simulate_first_order(head, attack, own_region(make_inner(4)), own_region(query), 2,
                                          torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one region around the whole attack, as protect runs it
        shared, q_shared = simulate_first_order(head, attack, make_inner(4), query, 2,
                                                torch.Generator().manual_seed(1))
    assert q_shared == pytest.approx(q_fresh, rel=1e-4)
    for k in fresh:
        torch.testing.assert_close(shared[k], fresh[k], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("order", ["first", "second"])
def test_a_clipping_simulated_attacker_steps_by_lr_times_the_clip_norm(order):
    """One SGD step (the momentum buffer starts at the gradient) moves the weights by lr x the
    clip norm, in the unclipped step's direction; the query sees those weights in both MAML orders."""
    head, z, x, make_inner, query = _setup()
    before = {k: v.detach().clone() for k, v in head.named_parameters()}
    seen = []

    def recording(params):
        seen.append({k: v.detach().clone() for k, v in params.items()})
        return query(params)

    def step(max_norm):
        attack = SimulatedAttack("sgd", 1e-2, 4, 1, "image", "full", 4, max_grad_norm=max_norm)
        if order == "first":
            simulate_first_order(head, attack, make_inner(4), recording, queries=1,
                                 generator=torch.Generator().manual_seed(1))
        else:
            simulate_second_order(head, attack, make_inner(4), recording, torch.Generator().manual_seed(1))
        return {k: seen[-1][k] - before[k] for k in before}

    free = step(None)
    clip = _norm(free) / 1e-2 / 4  # a quarter of the gradient's norm
    clipped = step(clip)
    assert _norm(clipped) == pytest.approx(1e-2 * clip, rel=1e-3)
    for k in before:
        torch.testing.assert_close(clipped[k] * 4, free[k], rtol=1e-3, atol=1e-6)  # fp32 weights: ~1e-7 each


def test_the_attack_space_hands_its_clip_norm_to_every_drawn_attack_and_draws_the_same_attacks():
    clipped = AttackSpaceConfig(max_grad_norm=1.0)
    a, b = np.random.default_rng(0), np.random.default_rng(0)
    drawn = [sample_attack(a, clipped) for _ in range(20)]
    plain = [sample_attack(b, AttackSpaceConfig()) for _ in range(20)]
    assert all(d.max_grad_norm == 1.0 for d in drawn) and all(p.max_grad_norm is None for p in plain)
    assert [dataclasses.replace(d, max_grad_norm=None) for d in drawn] == plain


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True])
def test_a_bad_clip_norm_for_the_simulated_attacker_is_refused(value):
    with pytest.raises(ValueError, match="attacks.max_grad_norm must be a positive finite number"):
        AttackSpaceConfig(max_grad_norm=value)


def test_the_second_order_clip_is_differentiated_through():
    """Full MAML through clipped SGD steps: the outer gradient matches central finite differences
    (float64, clipping active at every step)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(0)
    x, y, xq = (torch.randn(n, generator=g, dtype=torch.float64) for n in ((8, 3), (8, 2), (4, 3)))

    def inner(params, gen):
        return F.mse_loss(functional_call(module, params, (x,)), y)

    def query(params):
        return functional_call(module, params, (xq,)).pow(2).mean()

    attack = SimulatedAttack("sgd", 0.1, 8, 3, "image", "full", 4, max_grad_norm=0.05)
    outer = torch.autograd.grad(simulate_second_order(module, attack, inner, query, torch.Generator()),
                                list(module.parameters()))
    assert torch.linalg.vector_norm(torch.autograd.grad(inner(dict(module.named_parameters()), None),
                                                        module.weight)[0]) > 0.05  # the clip acts
    for p, grad in zip(module.parameters(), outer):
        for i in range(p.numel()):
            p.data.view(-1)[i] += 1e-6
            up = simulate_second_order(module, attack, inner, query, torch.Generator()).item()
            p.data.view(-1)[i] -= 2e-6
            down = simulate_second_order(module, attack, inner, query, torch.Generator()).item()
            p.data.view(-1)[i] += 1e-6
            assert grad.view(-1)[i].item() == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)
