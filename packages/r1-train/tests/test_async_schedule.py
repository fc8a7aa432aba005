"""The asynchronous trainer's staleness rule, on its pure part: which ready groups a step takes."""

from __future__ import annotations

import random

from r1_train.agent_loop import Trajectory
from r1_train.async_trainer import ReadyGroup, RolloutsLost, pick_groups
from r1_train.tasks import Task


def _group(step: int, slot: int, versions: list[int], launched: int = 0) -> ReadyGroup:
    t = Trajectory(Task(id=f"t{step}.{slot}", prompt="q", answer="1"), slot, 0, [1])
    t.append([5] * len(versions), [0.0] * len(versions), trained=True, versions=versions)
    t.append([7, 7], [], trained=False)  # an observation: not trained, no version
    return ReadyGroup(step, slot, [t], launched)


def test_oldest_version_counts_trained_tokens_only() -> None:
    g = _group(0, 0, [3, 3, 4, 5])
    assert g.oldest_version == 3
    assert g.trajs[0].versions[-2:] == [-1, -1]
    assert _group(0, 0, [], launched=2).oldest_version == 2  # nothing sampled: launch version


def test_pick_takes_oldest_prompts_first_and_waits_for_enough() -> None:
    ready = [_group(1, 0, [1]), _group(0, 1, [1]), _group(0, 0, [1])]
    chosen, stale = pick_groups(ready, 2, version=1, max_staleness=0)
    assert [(g.step, g.slot) for g in chosen] == [(0, 0), (0, 1)]
    assert stale == []
    assert pick_groups(ready, 4, version=1, max_staleness=0) == ([], [])


def test_stale_groups_are_never_chosen() -> None:
    ready = [_group(0, 0, [0, 2]), _group(0, 1, [2]), _group(1, 0, [1, 1])]
    chosen, stale = pick_groups(ready, 1, version=2, max_staleness=0)
    assert [(g.step, g.slot) for g in stale] == [(0, 0), (1, 0)]  # tokens of v0 and v1
    assert [(g.step, g.slot) for g in chosen] == [(0, 1)]


def test_bound_holds_under_an_adversarial_mix() -> None:
    """Simulate versions advancing while very long and very short groups finish in random
    order; every group a step takes satisfies version - oldest <= k."""
    rng = random.Random(0)
    for k in (0, 1, 3):
        version, ready, taken = 0, [], 0
        for _ in range(400):
            # a long group started many versions ago, or a short one from now
            start = version - rng.choice([0, 0, 0, 1, 2, 5, 9])
            ready.append(_group(rng.randrange(50), rng.randrange(4), [max(0, start), version]))
            chosen, stale = pick_groups(ready, 3, version, k)
            for g in stale + chosen:
                ready.remove(g)
            for g in chosen:
                assert version - g.oldest_version <= k
            if chosen:
                taken += len(chosen)
                version += 1
        assert taken > 0


def test_lost_rollouts_name_the_failed_groups_too() -> None:
    """Every group in flight failed at once (the engine died): none is in flight or ready any
    more, and the error still names each one, so the loss is not reported as nothing."""
    lost = RolloutsLost(RuntimeError("engine dead"), [], 0, [(2, 1), (1, 0)])
    assert lost.failed == [(1, 0), (2, 1)]
    assert "failed groups: step 1 prompt 0, step 2 prompt 1" in str(lost)
    assert "0 group(s) in flight" in str(lost)
    waiting = RolloutsLost(RuntimeError("x"), [_group(3, 0, [1])], 2)
    assert "failed groups: none" in str(waiting)
    assert "finished groups: step 3 prompt 0" in str(waiting)
