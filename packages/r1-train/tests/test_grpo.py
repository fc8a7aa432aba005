"""GRPO maths against numbers worked out by hand (each in the comment beside it)."""

from __future__ import annotations

import math

import pytest
import torch

from r1_train.grpo import (
    group_advantages,
    informative_groups,
    kl_k3,
    overlong_penalty,
    policy_loss,
    token_logprobs,
)

LOG = math.log


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    # groups of 2: [1,0] [0,1] [1,1]; means .5 .5 1; unbiased std sqrt(.5) sqrt(.5) 0
    adv = group_advantages(rewards, 2)
    s = math.sqrt(0.5) + 1e-4
    assert adv.tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.0, 0.0])
    assert group_advantages(rewards, 2, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0]
    # batch std of [1,0,0,1,1,1]: mean 2/3, var (4*(1/9) + 2*(4/9)) / 5 = 12/45
    b = math.sqrt(12 / 45) + 1e-4
    assert group_advantages(rewards, 2, scale="batch")[0].item() == pytest.approx(0.5 / b)


def test_group_advantages_reject_a_group_size_that_does_not_divide() -> None:
    with pytest.raises(
        ValueError, match=r"group_size \(4\) must divide the number of rewards \(6\)"
    ):
        group_advantages(torch.zeros(6), 4)


def test_dynamic_sampling_keeps_groups_with_signal() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert informative_groups(rewards, 2).tolist() == [False, True, False]


def test_overlong_penalty_is_linear_in_the_buffer() -> None:
    # max 10, buffer 4: free up to 6 tokens, -1 at 10 and beyond
    got = overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), max_length=10, buffer=4)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_token_logprobs_picks_the_token_under_temperature() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    got = token_logprobs(logits, torch.tensor([[0, 1]]))
    assert got.tolist()[0] == pytest.approx([LOG(0.5), LOG(0.8)])
    # temperature 2 on logits log(p): softmax(log p / 2) ∝ sqrt(p)
    hot = token_logprobs(logits, torch.tensor([[0, 1]]), temperature=2.0)
    r = math.sqrt(0.5) / (math.sqrt(0.5) + 2 * math.sqrt(0.25))
    assert hot[0, 0].item() == pytest.approx(LOG(r), rel=1e-6)


def test_kl_k3_by_hand() -> None:
    # p=.5, p_ref=.25: ratio .5 -> .5 - log .5 - 1 = 0.19315
    got = kl_k3(torch.tensor([LOG(0.5)]), torch.tensor([LOG(0.25)]))
    assert got.item() == pytest.approx(0.5 - LOG(0.5) - 1)
    assert kl_k3(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


def _pair(p: list[float], old: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log(torch.tensor([p])), torch.log(torch.tensor([old]))


def test_clipped_surrogate_by_hand() -> None:
    logp, old = _pair([0.5, 0.25], [0.25, 0.25])  # ratios 2 and 1
    mask = torch.ones(1, 2)
    # A=+1: min(2, 1.2) and min(1, 1) -> per-token -1.2, -1 -> mean -1.1; one token clipped high
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-1.1)
    assert (stats.clip_high, stats.clip_low, stats.ratio_max) == (0.5, 0.0, pytest.approx(2.0))
    # A=-1: min(-2, -1.2) = -2 -> per-token 2, 1 -> 1.5; a pessimistic bound, nothing clipped
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(1.5)
    assert stats.clip_fraction == 0.0


def test_clip_higher_lets_a_rising_token_grow_further() -> None:
    logp, old = _pair([0.3125], [0.25])  # ratio 1.25
    mask = torch.ones(1, 1)
    sym, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, epsilon_low=0.2)
    high, st = policy_loss(logp, old, torch.tensor([1.0]), mask, epsilon_low=0.2, epsilon_high=0.28)
    assert (sym.item(), high.item()) == (pytest.approx(-1.2), pytest.approx(-1.25))
    assert st.clip_high == 0.0


def test_gradient_flows_only_where_unclipped() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    # token 0 is clipped (constant 1.2): no gradient; token 1: d(-ratio/2)/dlogp = -1/2
    assert logp.grad.tolist() == [[0.0, pytest.approx(-0.5)]]


def _two_lengths() -> dict[str, torch.Tensor]:
    # ratio 1 everywhere, so per-token loss is -A: seq 0 (A=+1) has 1 token, seq 1 (A=-1) has 3
    logp = torch.zeros(2, 3)
    return {
        "logp": logp,
        "old_logp": logp.clone(),
        "advantages": torch.tensor([1.0, -1.0]),
        "mask": torch.tensor([[1.0, 0, 0], [1, 1, 1]]),
    }


def test_normalisations_by_hand() -> None:
    b = _two_lengths()
    # grpo: mean of sequence means = (-1 + 1) / 2
    assert policy_loss(**b, loss_type="grpo")[0].item() == pytest.approx(0.0)
    # dapo/bnpo: token sum / tokens = (-1 + 3) / 4
    assert policy_loss(**b, loss_type="dapo")[0].item() == pytest.approx(0.5)
    assert policy_loss(**b, loss_type="bnpo")[0].item() == pytest.approx(0.5)
    # dr_grpo: token sum / (2 sequences x 3 max tokens)
    dr = policy_loss(**b, loss_type="dr_grpo", max_completion_length=3)[0]
    assert dr.item() == pytest.approx(2 / 6)


def test_kl_term_in_the_loss_by_hand() -> None:
    logp, old = _pair([0.5], [0.5])
    ref = torch.log(torch.tensor([[0.25]]))
    # ratio 1, A = 0 -> surrogate 0; KL 0.19315 x beta 0.1
    loss, st = policy_loss(logp, old, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * (0.5 - LOG(0.5) - 1))
    assert st.kl == pytest.approx(0.5 - LOG(0.5) - 1)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        policy_loss(logp, old, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_with_global_denominators_equal_the_whole_batch(loss_type: str) -> None:
    """8 x 1 and 2 x 4 accumulation give the whole batch's loss and gradient (TRL's invariant)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 6, generator=g, requires_grad=True)
    old = logits.detach() + 0.1 * torch.randn(8, 6, generator=g)
    adv = torch.randn(8, generator=g)
    mask = (torch.rand(8, 6, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    kw = {"loss_type": loss_type, "max_completion_length": 6, "beta": 0.05, "ref_logp": old * 0.9}

    whole, _ = policy_loss(logits, old, adv, mask, **kw)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    for micro in (1, 4):
        total = torch.zeros(())
        for i in range(0, 8, micro):
            sl = slice(i, i + micro)
            part, _ = policy_loss(
                logits[sl],
                old[sl],
                adv[sl],
                mask[sl],
                num_sequences=8,
                num_tokens=float(mask.sum()),
                **{**kw, "ref_logp": kw["ref_logp"][sl]},
            )
            total = total + part
        (grad_parts,) = torch.autograd.grad(total, logits)
        assert total.item() == pytest.approx(whole.item(), abs=1e-6)
        assert torch.allclose(grad_parts, grad_whole, atol=1e-7)


def test_unknown_loss_type_is_named() -> None:
    b = _two_lengths()
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        policy_loss(**b, loss_type="ppo")  # type: ignore[arg-type]


def test_importance_weights_by_hand() -> None:
    from r1_train.grpo import importance_weights

    trainer = torch.tensor([[LOG(0.5), LOG(0.9), LOG(0.2)]])
    sampler = torch.tensor([[LOG(0.5), LOG(0.3), LOG(0.8)]])
    # ratios pi_t / pi_s: 1, 3, 0.25
    assert importance_weights(trainer, sampler, "none", 2.0) is None
    tis = importance_weights(trainer, sampler, "tis", 2.0)
    assert tis is not None
    assert tis.tolist() == [pytest.approx([1.0, 2.0, 0.25])]  # truncated at 2 from above only
    mis = importance_weights(trainer, sampler, "mis", 2.0)
    assert mis is not None
    assert mis.tolist() == [pytest.approx([1.0, 0.0, 0.0])]  # 3 > 2 and 0.25 < 1/2: dropped
    with pytest.raises(ValueError, match="cap must be above 1"):
        importance_weights(trainer, sampler, "tis", 1.0)


def test_sampler_mismatch_by_hand() -> None:
    from r1_train.grpo import sampler_mismatch

    trainer = torch.tensor([[LOG(0.5), LOG(0.9), LOG(0.2)]])
    sampler = torch.tensor([[LOG(0.5), LOG(0.3), LOG(0.8)]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is an observation
    m = sampler_mismatch(trainer, sampler, mask, cap=2.0)
    # r = 1 and 3: k3 = (0 + (3 - 1 - ln 3)) / 2
    assert m.kl == pytest.approx((2 - LOG(3)) / 2)
    assert (m.ratio_max, m.ratio_min) == (pytest.approx(3.0), pytest.approx(1.0))
    assert m.off_fraction == pytest.approx(0.5)
    assert sampler_mismatch(trainer, sampler, torch.zeros(1, 3), cap=2.0).kl == 0.0


def test_importance_weights_scale_the_surrogate_not_the_kl() -> None:
    logp = torch.tensor([[LOG(0.5), LOG(0.5)]])
    ref = torch.tensor([[LOG(0.25), LOG(0.5)]])
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    w = torch.tensor([[2.0, 0.5]])
    loss, _ = policy_loss(logp, logp, adv, mask, beta=0.1, ref_logp=ref, is_weights=w)
    # surrogate -1 per token, weighted: -2 and -0.5; k3 of token 1: 0.5 - ln 0.5 - 1
    kl = 0.5 - LOG(0.5) - 1
    assert loss.item() == pytest.approx(((-2.0 + 0.1 * kl) + (-0.5)) / 2)


def test_bnpo_normalises_each_micro_batch_by_its_own_tokens() -> None:
    """bnpo (TRL's meaning) differs from dapo once the batch is split: micro-batch token means
    over the number of micro-batches, against the whole batch's token mean."""
    b = _two_lengths()  # per-token loss -1 (1 token) and +1 (3 tokens)
    parts = [{k: v[i : i + 1] for k, v in b.items()} for i in range(2)]
    bnpo = sum(policy_loss(**p, loss_type="bnpo", num_micro_batches=2)[0] for p in parts)
    # (-1/1) / 2 + (3/3) / 2 = 0
    assert float(bnpo) == pytest.approx(0.0)
    dapo = sum(policy_loss(**p, loss_type="dapo", num_tokens=4.0)[0] for p in parts)
    assert float(dapo) == pytest.approx(0.5)  # (-1 + 3) / 4, as unsplit


def test_sequence_level_ratio_is_clipped_per_sequence() -> None:
    """GSPO: one ratio per sequence, exp of the mean token log-ratio over trained tokens."""
    logp = torch.log(torch.tensor([[0.6, 0.9, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.5, 0.5, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is not trained
    # s = sqrt(1.2 * 1.8) = sqrt(2.16) = 1.4697; A = 1 > 0, clipped at 1.2: loss -1.2, no grad
    loss, st = policy_loss(
        logp, old, torch.tensor([1.0]), mask, importance_sampling_level="sequence"
    )
    assert loss.item() == pytest.approx(-1.2)
    assert st.clip_high == pytest.approx(1.0)  # both trained tokens count as clipped
    loss.backward()
    assert logp.grad is not None
    assert not logp.grad.any()
    # A = -1: min(-s, -1.2) = -s -> loss s; d s / d logp_t = s / 2 on trained tokens
    logp.grad = None
    loss, _ = policy_loss(
        logp, old, torch.tensor([-1.0]), mask, importance_sampling_level="sequence"
    )
    s = math.sqrt(2.16)
    assert loss.item() == pytest.approx(s)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([s / 2, s / 2, 0.0])
    with pytest.raises(ValueError, match="unknown importance_sampling_level 'tok'"):
        policy_loss(logp, old, torch.tensor([1.0]), mask, importance_sampling_level="tok")  # type: ignore[arg-type]


def test_bias_corrected_kl_changes_the_gradient_not_the_value_on_policy() -> None:
    """k3 KL times the policy ratio: value 1 x KL on-policy, gradient (KL + dKL) per token."""
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25]]))
    kw = {"beta": 1.0, "ref_logp": ref}
    plain, _ = policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), **kw)
    (g_plain,) = torch.autograd.grad(plain, logp)
    fixed, _ = policy_loss(
        logp,
        logp.detach(),
        torch.tensor([0.0]),
        torch.ones(1, 1),
        use_bias_correction_kl=True,
        **kw,
    )
    (g_fixed,) = torch.autograd.grad(fixed, logp)
    kl = 0.5 - LOG(0.5) - 1  # k3 with ref/pi = 0.5
    assert fixed.item() == pytest.approx(plain.item()) == pytest.approx(kl)
    # d k3 / d logp = 1 - ref/pi = 0.5; d (r k3) / d logp at r = 1: k3 + 0.5
    assert g_plain.item() == pytest.approx(0.5)
    assert g_fixed.item() == pytest.approx(kl + 0.5)


def test_sequence_importance_weights_by_hand() -> None:
    from r1_train.grpo import importance_weights

    trainer = torch.tensor([[LOG(0.5), LOG(0.9), LOG(0.2)], [LOG(0.5), LOG(0.5), LOG(0.5)]])
    sampler = torch.tensor([[LOG(0.5), LOG(0.3), LOG(0.8)], [LOG(0.4), LOG(0.5), LOG(0.5)]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # sequence ratios over trained tokens: 1 x 3 = 3, and 1.25
    st = importance_weights(trainer, sampler, "sequence_truncate", 2.0, mask=mask)
    assert st is not None
    assert st.tolist() == [pytest.approx([2.0] * 3), pytest.approx([1.25] * 3)]
    sm = importance_weights(trainer, sampler, "sequence_mask", 2.0, mask=mask)
    assert sm is not None
    assert sm.tolist() == [pytest.approx([0.0] * 3), pytest.approx([1.25] * 3)]
    with pytest.raises(ValueError, match="unknown importance-sampling correction 'seq'"):
        importance_weights(trainer, sampler, "seq", 2.0)  # type: ignore[arg-type]


def test_non_finite_inputs_get_no_weight() -> None:
    """A NaN/inf reward: advantage 0, the group normalised among the rest. A NaN sampler
    log-prob: weight 1 (no correction), left out of the mismatch statistics."""
    from r1_train.grpo import importance_weights, nonfinite, sampler_mismatch

    rewards = torch.tensor([1.0, math.nan, 0.0, 1.0, math.inf, 1.0])
    adv = group_advantages(rewards, 3)
    s = math.sqrt(0.5) + 1e-4  # [1, 0] left in group 0; [1, 1] in group 1: deviation 0
    assert adv.tolist() == pytest.approx([0.5 / s, 0.0, -0.5 / s, 0.0, 0.0, 0.0])
    assert informative_groups(rewards, 3).tolist() == [True, False]
    assert informative_groups(torch.tensor([math.nan] * 3), 3).tolist() == [False]
    assert nonfinite(rewards) == 2

    trainer = torch.tensor([[LOG(0.5), LOG(0.9)]])
    sampler = torch.tensor([[math.nan, LOG(0.3)]])
    w = importance_weights(trainer, sampler, "tis", 2.0)
    assert w is not None
    assert w.tolist() == [pytest.approx([1.0, 2.0])]
    assert nonfinite(sampler, torch.tensor([[1.0, 1.0]])) == 1
    assert nonfinite(sampler, torch.tensor([[0.0, 1.0]])) == 0  # padding does not count
    m = sampler_mismatch(trainer, sampler, torch.ones(1, 2), cap=2.0)
    assert (m.ratio_max, m.ratio_min) == (pytest.approx(3.0), pytest.approx(3.0))
