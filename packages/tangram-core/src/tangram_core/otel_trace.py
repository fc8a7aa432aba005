"""Simulator traces from a real run's spans: calibrate the simulator against what happened.

Why: the simulator's claims are only as good as its model of a run. Every action of a real run
is one ``tangram.action`` span (:mod:`.semconv`) that says when it was submitted (the span's
start), how long it queued (``tangram.action.queue_wait_s``), on how many units it ran and on
which pool, and when it ended. That is enough to rebuild an open-loop trace: each action arrives
when it really did and runs, rigidly, for as long as it really ran on the units it really got.
Replaying that trace at the run's capacity through the same scheduler should give the run's
ACT back; the gap (``replay_act_error``) is what the simulator leaves out (process start,
IPC, scheduling latency).

Input: OTLP JSON, as the OpenTelemetry Collector's file exporter writes it (one
``{"resourceSpans": ...}`` object per line, or one object for the whole file), or SDK spans in
memory (an ``InMemorySpanExporter``'s). Only successful actions become trace records: a failed
run's duration says nothing about the work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram_core import semconv as sc
from tangram_core.sim.workloads import TraceRecord

__all__ = [
    "ActionSpan",
    "load_otlp_json",
    "replay_act_error",
    "spans_from_sdk",
    "to_otlp_json",
    "trace_from_spans",
]


@dataclass(frozen=True, slots=True)
class ActionSpan:
    """A span reduced to what a trace needs: its name, times (ns) and attributes."""

    name: str
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any]


def _value(v: Mapping[str, Any]) -> Any:
    """An OTLP JSON ``AnyValue``: ints come as strings (int64 in JSON), as the spec says."""
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "boolValue" in v:
        return bool(v["boolValue"])
    return None


def _spans_of(doc: Mapping[str, Any]) -> Iterable[ActionSpan]:
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                attrs = {a["key"]: _value(a.get("value", {})) for a in span.get("attributes", [])}
                yield ActionSpan(
                    span["name"],
                    int(span["startTimeUnixNano"]),
                    int(span["endTimeUnixNano"]),
                    attrs,
                )


def load_otlp_json(path: Path) -> list[ActionSpan]:
    """Every span of an OTLP JSON file (one document, or one per line); errors name the line."""
    text = Path(path).read_text()
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError:
        docs = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not OTLP JSON: {exc}") from exc
    spans: list[ActionSpan] = []
    for doc in docs:
        try:
            spans.extend(_spans_of(doc))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not an OTLP JSON span export: missing {exc}") from exc
    return spans


def spans_from_sdk(spans: Iterable[Any]) -> list[ActionSpan]:
    """OpenTelemetry SDK ``ReadableSpan`` objects (e.g. an ``InMemorySpanExporter``'s)."""
    return [ActionSpan(s.name, s.start_time, s.end_time, dict(s.attributes or {})) for s in spans]


def to_otlp_json(spans: Sequence[ActionSpan]) -> dict[str, Any]:
    """The OTLP JSON document for ``spans`` (one resource, one scope): what a collector writes."""

    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    return {
        "resourceSpans": [
            {
                "resource": {"attributes": []},
                "scopeSpans": [
                    {
                        "scope": {"name": "tangram-core"},
                        "spans": [
                            {
                                "name": s.name,
                                "startTimeUnixNano": str(s.start_ns),
                                "endTimeUnixNano": str(s.end_ns),
                                "attributes": [
                                    {"key": k, "value": value(v)} for k, v in s.attributes.items()
                                ],
                            }
                            for s in spans
                        ],
                    }
                ],
            }
        ]
    }


def trace_from_spans(
    spans: Iterable[ActionSpan],
    pools: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[TraceRecord], list[float]]:
    """Trace records from the successful action spans, and the run's real ACTs (seconds).

    ``pools`` maps a pool name (``tangram.pool.name``) to its per-unit demand, e.g.
    ``{"sandbox": {"cpu": 1}, "reward": {"gpu": 1}}``; a pool not named there is taken to be
    ``{pool_name: 1}``. Each action becomes rigid on the units it ran on, for as long as it ran,
    so that a replay holds exactly the units the run held. Times start at the first submission.
    """
    pools = pools or {}
    actions = [
        s
        for s in spans
        if s.name == sc.SPAN_ACTION and s.attributes.get(sc.ACTION_STATUS, "ok") == "ok"
    ]
    if not actions:
        raise ValueError(
            f"no successful {sc.SPAN_ACTION!r} spans: export the run's traces with "
            "OTEL_TRACES_EXPORTER=otlp (or console) and pass that file"
        )
    t0 = min(s.start_ns for s in actions)
    records: list[TraceRecord] = []
    acts: list[float] = []
    for i, s in enumerate(sorted(actions, key=lambda s: s.start_ns)):
        a = s.attributes
        submit = (s.start_ns - t0) / 1e9
        end = (s.end_ns - t0) / 1e9
        wait = float(a.get(sc.ACTION_QUEUE_WAIT_S, 0.0))
        run = max(end - submit - wait, 1e-6)
        units = max(int(a.get(sc.ACTION_UNITS, 1)), 1)
        pool = str(a.get(sc.POOL_NAME, "cpu"))
        per_unit = pools.get(pool, {pool: 1.0})
        traj = a.get(sc.TRAJECTORY_ID)
        records.append(
            TraceRecord(
                id=str(a.get(sc.ACTION_ID, f"span{i}")),
                kind=str(a.get(sc.ACTION_KIND, "action")),
                arrival_s=submit,
                duration_s=run,
                demand={r: d * units for r, d in per_unit.items()},
                trajectory_id=None if traj is None else str(traj),
            )
        )
        acts.append(end - submit)
    return records, acts


def replay_act_error(
    records: Sequence[TraceRecord], real_acts: Sequence[float], capacity: Mapping[str, float]
) -> tuple[float, float]:
    """Replay ``records`` at ``capacity`` through the elastic scheduler; returns the replay's
    mean ACT and its relative error against the real run's mean ACT."""
    from tangram_core.elastic_scheduler import ElasticScheduler
    from tangram_core.sim.engine import Simulator

    result = Simulator(ElasticScheduler(capacity), name="replay").run_trace(
        [r.to_sim() for r in records]
    )
    replay = sum(result.acts()) / result.n_actions
    real = sum(real_acts) / len(real_acts)
    return replay, abs(replay - real) / real
