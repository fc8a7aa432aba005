#!/usr/bin/env python3
"""Tangram demo: one GRPO-style rollout round on a real model, traced end to end.

This is the most complete path that runs until r1-train lands (it then becomes
``python -m r1_train demo``). It:

1. sets up OpenTelemetry from the standard ``OTEL_*`` variables (``tangram_core.telemetry``);
2. starts vLLM on CPU with SmolLM2-135M-Instruct, built offline by ``tools/models``;
3. samples a group of answers per arithmetic question, as GRPO does;
4. scores each answer (exact integer match) and computes group-normalised advantages;
5. emits a GenAI-convention span per request, under one ``tangram.demo`` span.

Try ``OTEL_TRACES_EXPORTER=console make demo`` to see the spans, or point
``OTEL_EXPORTER_OTLP_ENDPOINT`` at a collector.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Question:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"What is {self.a} + {self.b}? Answer with just the number."

    @property
    def answer(self) -> int:
        return self.a + self.b


def first_answer(text: str) -> int | None:
    """The integer the model gave on its first line: the first after the last '=', else the last.

    "2 + 3 = 5" gives 5 and "17 + 33 is indeed 50." gives 50. A deliberately small stand-in for
    reward-serve's verifiers, which replace it in r1-train.
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    if "=" in line:
        after = _INT.search(line.rsplit("=", 1)[1])
        if after:
            return int(after.group())
    numbers = _INT.findall(line)
    return int(numbers[-1]) if numbers else None


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO's group-normalised advantage: (r - mean) / (std + eps)."""
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    return [(r - mean) / (std + 1e-6) for r in rewards]


def model_path() -> Path:
    """SmolLM2, built offline by tools/models on first use."""
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure("smollm2"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from tangram_core import configure_telemetry, get_tracer
    from tangram_core import semconv as sc

    console = Console()
    telemetry = configure_telemetry("tangram-demo")
    tracer = get_tracer()
    console.rule("[bold]Tangram demo: GRPO rollout round on SmolLM2-135M-Instruct (vLLM, CPU)")
    console.print(
        f"telemetry: traces={','.join(telemetry.traces_exporters) or 'off'} "
        f"metrics={','.join(telemetry.metrics_exporters) or 'off'} "
        "(set OTEL_TRACES_EXPORTER=console or OTEL_EXPORTER_OTLP_ENDPOINT)"
    )

    rng = random.Random(args.seed)
    questions = [Question(rng.randint(1, 49), rng.randint(1, 49)) for _ in range(args.questions)]
    path = model_path()
    model_name = path.name

    from vllm import LLM, SamplingParams

    with tracer.start_as_current_span(sc.SPAN_DEMO) as root:
        t0 = time.monotonic()
        with console.status("starting vLLM engine (about 20-30 s on 2 CPU cores) ..."):
            llm = LLM(model=str(path), max_model_len=1024, seed=args.seed, enforce_eager=True)
        t_start = time.monotonic() - t0
        console.print(f"engine ready in {t_start:.1f}s")

        params = SamplingParams(
            n=args.group_size,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
        messages = [[{"role": "user", "content": q.prompt}] for q in questions]
        start_ns = time.time_ns()
        t1 = time.monotonic()
        outputs = llm.chat(messages, params, use_tqdm=True)
        t_gen = time.monotonic() - t1
        end_ns = time.time_ns()

        table = Table(title=f"{len(questions)} questions x {args.group_size} samples")
        table.add_column("question")
        table.add_column("answer", justify="right")
        table.add_column("sampled answers (reward, advantage)")
        table.add_column("acc", justify="right")
        total_out = 0
        all_rewards: list[float] = []
        for q, out in zip(questions, outputs, strict=True):
            rewards = [float(first_answer(c.text) == q.answer) for c in out.outputs]
            advs = group_advantages(rewards)
            all_rewards += rewards
            n_in = len(out.prompt_token_ids or [])
            n_out = sum(len(c.token_ids) for c in out.outputs)
            total_out += n_out
            # One GenAI span per request; the batch ran them concurrently, so each spans it.
            span = tracer.start_span(
                sc.gen_ai_span_name(sc.OP_CHAT, model_name),
                start_time=start_ns,
                attributes={
                    sc.GEN_AI_OPERATION_NAME: sc.OP_CHAT,
                    sc.GEN_AI_PROVIDER_NAME: sc.PROVIDER_VLLM,
                    sc.GEN_AI_REQUEST_MODEL: model_name,
                    sc.GEN_AI_REQUEST_MAX_TOKENS: args.max_tokens,
                    sc.GEN_AI_REQUEST_TEMPERATURE: args.temperature,
                    sc.GEN_AI_REQUEST_CHOICE_COUNT: args.group_size,
                    sc.GEN_AI_REQUEST_SEED: args.seed,
                    sc.GEN_AI_RESPONSE_ID: str(out.request_id),
                    sc.GEN_AI_RESPONSE_FINISH_REASONS: [str(c.finish_reason) for c in out.outputs],
                    sc.GEN_AI_USAGE_INPUT_TOKENS: n_in,
                    sc.GEN_AI_USAGE_OUTPUT_TOKENS: n_out,
                    sc.REWARD: statistics.fmean(rewards),
                },
            )
            span.end(end_time=end_ns)
            samples = "\n".join(
                f"{first_answer(c.text)!s:>5} ({r:.0f}, {a:+.2f})  {c.text.strip()[:32]!r}"
                for c, r, a in zip(out.outputs, rewards, advs, strict=True)
            )
            table.add_row(
                f"{q.a} + {q.b}", str(q.answer), samples, f"{statistics.fmean(rewards):.2f}"
            )
        accuracy = statistics.fmean(all_rewards)
        root.set_attribute(sc.REWARD, accuracy)
        console.print(table)
        console.print(
            f"accuracy {accuracy:.1%} | generated {total_out} tokens in {t_gen:.1f}s "
            f"({total_out / t_gen:.0f} tok/s) | engine start {t_start:.1f}s"
        )
        groups_with_signal = sum(
            len({float(first_answer(c.text) == q.answer) for c in o.outputs}) > 1
            for q, o in zip(questions, outputs, strict=True)
        )
        console.print(
            f"{groups_with_signal}/{len(questions)} groups have mixed rewards "
            "(non-zero GRPO advantage)."
        )
    telemetry.force_flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
