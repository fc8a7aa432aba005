"""A real run's spans become a simulator trace, and the replay gives the run's ACT back."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys

import pytest

from tangram_core import semconv as sc
from tangram_core.orchestrator import Orchestrator
from tangram_core.otel_trace import (
    ActionSpan,
    load_otlp_json,
    replay_act_error,
    spans_from_sdk,
    to_otlp_json,
    trace_from_spans,
)
from tangram_core.process_pool import ProcessPoolManager, function_action

SLEEP = "tangram_core.process_pool:sleep_task"


def real_run(n: int = 30, workers: int = 2, seed: int = 5) -> None:
    """Sleeps of 0.1-0.4 s arriving ~70% of two workers' capacity: a run that queues."""
    rng = random.Random(seed)

    async def main() -> None:
        async with Orchestrator([ProcessPoolManager(workers)]) as orch:
            tasks = []
            for i in range(n):
                d = rng.uniform(0.1, 0.4)
                action = function_action(
                    SLEEP, d, estimated_duration_s=d, trajectory_id=f"t{i % 6}"
                )
                tasks.append(asyncio.create_task(orch.submit(action)))
                await asyncio.sleep(rng.expovariate(workers * 0.7 / 0.25))
            await asyncio.gather(*tasks)

    asyncio.run(main())


def test_a_real_run_replays_within_15_percent(span_exporter, tmp_path):
    real_run()
    spans = spans_from_sdk(span_exporter.get_finished_spans())
    path = tmp_path / "spans.json"
    path.write_text(json.dumps(to_otlp_json(spans)))
    records, acts = trace_from_spans(load_otlp_json(path), {"process": {"cpu": 1.0}})
    assert len(records) == len(acts) == 30
    assert all(r.demand == {"cpu": 1.0} for r in records)
    assert all(0.09 < r.duration_s < 1.0 for r in records)
    assert max(a - r.duration_s for a, r in zip(acts, records, strict=True)) > 0.05  # it queued
    _, error = replay_act_error(records, acts, {"cpu": 2.0})
    assert error <= 0.15

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tangram_core.cli",
            "trace-from-otel",
            str(path),
            "--pool",
            "process=cpu:1",
            "--out",
            str(tmp_path / "trace.jsonl"),
            "--replay",
            "cpu=2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "30 actions" in out.stdout
    assert "replay_act_error" in out.stdout
    assert len((tmp_path / "trace.jsonl").read_text().splitlines()) == 30


def test_otlp_json_lines_and_failed_actions(tmp_path):
    ok = ActionSpan(
        sc.SPAN_ACTION,
        1_000_000_000,
        3_000_000_000,
        {
            sc.ACTION_STATUS: "ok",
            sc.ACTION_QUEUE_WAIT_S: 0.5,
            sc.ACTION_UNITS: 2,
            sc.POOL_NAME: "reward",
            sc.ACTION_KIND: "reward.rm",
            sc.TRAJECTORY_ID: "t1",
        },
    )
    failed = ActionSpan(sc.SPAN_ACTION, 0, 10, {sc.ACTION_STATUS: "error"})
    other = ActionSpan("tangram.rollout", 0, 10, {})
    path = tmp_path / "spans.jsonl"
    path.write_text(
        json.dumps(to_otlp_json([ok, other])) + "\n" + json.dumps(to_otlp_json([failed])) + "\n"
    )
    (record,), acts = trace_from_spans(load_otlp_json(path))
    assert record.demand == {"reward": 2.0}  # rigid on the units it ran on
    assert record.duration_s == pytest.approx(1.5)
    assert acts == [pytest.approx(2.0)]
    assert (record.kind, record.trajectory_id, record.arrival_s) == ("reward.rm", "t1", 0.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_otlp_json(bad)
    with pytest.raises(ValueError, match="no successful"):
        trace_from_spans([failed])
