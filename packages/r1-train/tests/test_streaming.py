"""The streaming engine on real vLLM (CPU): weights change between decode steps, per-token
versions come back from vLLM, and ``drop`` aborts what is in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from r1_train.config import RolloutConfig
from r1_train.rollout import GenRequest, VLLMEngine, weight_fingerprint
from r1_train.streaming import RolloutDropped, StreamingEngine, token_versions

pytestmark = pytest.mark.slow


def test_token_versions_expands_spans() -> None:
    class Span:
        def __init__(self, version: str, start: int, end: int) -> None:
            self.version, self.start, self.end = version, start, end

    assert token_versions([Span("3", 0, 2), Span("4", 2, 5)], 5, 0) == [3, 3, 4, 4, 4]
    assert token_versions(None, 3, 7) == [7, 7, 7]  # vLLM reported no label: the submit version


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    cfg = RolloutConfig(max_new_tokens=64, max_total_tokens=128, temperature=1.0)
    eng = VLLMEngine(tiny_model_dir, cfg, seed=0, dtype="float32")
    yield eng
    eng.close()


def _perturbed(model_dir: Path, scale: float) -> dict:
    from safetensors.torch import load_file

    return {k: v * scale for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def test_stream_without_updates_samples_what_the_blocking_engine_samples(
    engine: VLLMEngine,
) -> None:
    reqs = [GenRequest([1, 2, 3, 4 + i], 24, seed=100 + i) for i in range(3)]
    blocking = engine.generate(reqs)
    stream = StreamingEngine(engine, version=5)

    async def go() -> list:
        return await asyncio.gather(*(stream.generate(r) for r in reqs))

    try:
        streamed = asyncio.run(go())
    finally:
        stream.stop()
    for b, s in zip(blocking, streamed, strict=True):
        assert s.token_ids == b.token_ids
        assert s.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert s.versions == [5] * len(s.token_ids)
    assert engine.generate(reqs[:1])[0].token_ids == blocking[0].token_ids  # usable again


def test_update_lands_between_decode_steps(engine: VLLMEngine, tiny_model_dir: Path) -> None:
    stream = StreamingEngine(engine, version=0, on_update="continue", recompute_kv=True)
    state = _perturbed(tiny_model_dir, 1.5)

    async def go() -> tuple[list, float]:
        tasks = [
            asyncio.ensure_future(stream.generate(GenRequest([1, 2, 3, 9 + i], 60, seed=i)))
            for i in range(3)
        ]
        while stream.busy_s == 0.0:  # the first decode steps have run
            await asyncio.sleep(0.01)
        fp = await stream.update_weights(state, 1)
        return list(await asyncio.gather(*tasks)), fp

    try:
        gens, fp = asyncio.run(go())
    finally:
        stream.stop()
    assert fp == pytest.approx(weight_fingerprint(state), rel=1e-9)
    mixed = 0
    for g in gens:
        assert g.versions is not None
        assert g.versions == sorted(g.versions), "versions never go back"
        assert set(g.versions) <= {0, 1}
        mixed += {0, 1} <= set(g.versions)
    # every request was in flight when the update landed (60 tokens each, updated after step 1)
    # unless it had already stopped at EOS
    assert mixed >= 1
    assert stream.version == 1
    stream2 = StreamingEngine(engine, version=1)  # restore the original weights for other tests
    try:
        asyncio.run(stream2.update_weights(_perturbed(tiny_model_dir, 1.0), 2))
    finally:
        stream2.stop()


def test_drop_aborts_requests_in_flight(engine: VLLMEngine, tiny_model_dir: Path) -> None:
    stream = StreamingEngine(engine, version=0, on_update="drop")
    state = _perturbed(tiny_model_dir, 1.0)

    async def go() -> list:
        tasks = [
            asyncio.ensure_future(stream.generate(GenRequest([1, 2, 3], 60, seed=7)))
            for _ in range(2)
        ]
        while stream.busy_s == 0.0:
            await asyncio.sleep(0.01)
        await stream.update_weights(state, 1)
        after = await stream.generate(GenRequest([1, 2, 3], 4, seed=7))
        return [*(await asyncio.gather(*tasks, return_exceptions=True)), after]

    try:
        first, second, after = asyncio.run(go())
    finally:
        stream.stop()
    assert isinstance(first, RolloutDropped) or isinstance(second, RolloutDropped)
    assert stream.dropped >= 1
    assert after.versions == [1] * len(after.token_ids)  # the engine goes on after a drop


def test_a_dead_engine_fails_every_waiter_loudly(tiny_model_dir: Path) -> None:
    """The engine-core process dies mid-generation: each waiting request raises (nothing
    hangs, nothing is returned half-done), and later calls say the engine failed."""
    import psutil

    cfg = RolloutConfig(max_new_tokens=64, max_total_tokens=128)
    eng = VLLMEngine(tiny_model_dir, cfg, seed=0, dtype="float32")
    stream = StreamingEngine(eng, version=0)

    async def go() -> list:
        tasks = [
            asyncio.ensure_future(stream.generate(GenRequest([1, 2, 3], 64, seed=i)))
            for i in range(3)
        ]
        while stream.busy_s == 0.0:
            await asyncio.sleep(0.01)
        for child in psutil.Process().children(recursive=True):
            try:  # an earlier test may have left a zombie child: skip it
                if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
                    child.kill()
            except psutil.Error:
                continue
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)

    try:
        results = asyncio.run(go())
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed, "the kill landed after every request had finished"
        for r in results:  # a request that finished before the kill is whole
            assert isinstance(r, BaseException) or r.finish_reason in ("stop", "length")
        with pytest.raises(RuntimeError, match="rollout engine failed"):
            asyncio.run(stream.generate(GenRequest([1], 2, seed=0)))
    finally:
        stream.stop()
        eng.close()
