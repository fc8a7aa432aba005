"""``r1-train``: GRPO, SFT, rejection sampling and distillation from a YAML config, pass@k
evaluation, and a run's curves.

    r1-train run --config configs/arithmetic_tool.yaml run.steps=20 grpo.beta=0.001
    r1-train run --config FILE.yaml --resume
    r1-train run --config FILE.yaml cluster.address=auto cluster.trainer.ranks=2 \
        cluster.rollout.engines=2          # trainer ranks and vLLM engines on a Ray cluster
    r1-train plot runs/r1
    r1-train eval --config FILE.yaml model.path=runs/r1/checkpoint-000020 eval.samples=10 \
        eval.k=[1,10]                      # pass@k on HumanEval, programs run in the sandbox
    r1-train sft --config FILE.yaml sft.path=chats.jsonl   # supervised fine-tuning
    r1-train sample --config FILE.yaml sample.n=8          # rejection sampling into an SFT set
    r1-train distill --config FILE.yaml distill.loss=reverse_kl   # teacher -> student logits

A bad config prints every bad field with its rule and exits with status 2, before anything
starts. Telemetry follows the standard ``OTEL_*`` variables (e.g.
``OTEL_TRACES_EXPORTER=console``, or ``OTEL_EXPORTER_OTLP_ENDPOINT``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train with GRPO")
    run.add_argument("--config", type=Path, help="YAML config (see packages/r1-train/configs/)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show vLLM's, Ray's and the other libraries' output here, not only in the log file",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, overrides, defaults) as YAML and exit",
    )
    run.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    ev = sub.add_parser("eval", help="pass@k and accuracy on HumanEval or the task.* tasks")
    ev.add_argument("--config", type=Path, help="YAML: model, rollout, task and eval sections")
    ev.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    sft = sub.add_parser("sft", help="supervised fine-tuning on JSONL chat data")
    sft.add_argument("--config", type=Path, help="YAML: model, optim, run and sft sections")
    sft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    sft.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    smp = sub.add_parser(
        "sample", help="rejection sampling: keep the teacher's verified answers as an SFT set"
    )
    smp.add_argument("--config", type=Path, help="YAML: model, rollout, task and sample sections")
    smp.add_argument("--resume", action="store_true", help="skip prompts already sampled")
    smp.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    dst = sub.add_parser("distill", help="logit distillation from a teacher into a student")
    dst.add_argument("--config", type=Path, help="YAML: model, optim, run and distill sections")
    dst.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    dst.add_argument("overrides", nargs="*", help="section.field=value (YAML values)")
    plot = sub.add_parser("plot", help="draw a run's curves as PNG")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--out", type=Path, default=None, help="folder (default RUN_DIR/plots)")
    return p


def print_table(rows: list[dict[str, object]]) -> None:
    """Reward per step, as the demo prints it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GRPO steps")
    cols = [
        "step",
        "reward_mean",
        "accuracy",
        "response_tokens_mean",
        "tool_calls",
        "loss",
        "time/step",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for row in rows:
        cells = []
        for col in cols:
            v = row.get(col)
            cells.append(f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v))
        table.add_row(*cells)
    Console().print(table)


def _run_failures() -> tuple[type[BaseException], ...]:
    """The errors a run ends with on purpose, each with a message that says what to do."""
    from r1_train.async_trainer import RolloutsLost
    from r1_train.checkpoint import CheckpointWriteFailed
    from r1_train.engine_pool import EnginesLost
    from r1_train.nonfinite import NonFiniteError
    from r1_train.placement import PlacementError
    from r1_train.rank_group import TrainerRankLost
    from r1_train.rewards import RewardError
    from r1_train.trainer import NothingTrained, StepLost

    failures = (CheckpointWriteFailed, RewardError, NothingTrained, StepLost, NonFiniteError)
    cluster = (TrainerRankLost, EnginesLost, PlacementError)
    return (RolloutsLost, *failures, *cluster)


def _eval(args: argparse.Namespace) -> int:
    """``r1-train eval``: bad config or data exits 2 (file and row named), a sandbox that
    could not judge a sample exits 1; the summary is printed and written to eval.out_dir."""
    from r1_train.config import ConfigError
    from r1_train.evaluate import load_eval_config, run_eval

    try:
        cfg = load_eval_config(args.config, list(args.overrides))
    except ConfigError as exc:
        print(f"r1-train eval: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r1_train.humaneval import CompletionsError, SandboxUnavailable
    from r1_train.tasks import TaskDataError

    try:
        report = asyncio.run(run_eval(cfg))
    except (ConfigError, CompletionsError, TaskDataError, ImportError) as exc:
        print(f"r1-train eval: {exc}", file=sys.stderr)
        return 2
    except SandboxUnavailable as exc:
        print(f"r1-train eval: the sandbox could not judge a sample: {exc}", file=sys.stderr)
        return 1
    scores = "  ".join(f"{k} {v:.4f}" for k, v in report.scores.items())
    print(
        f"{report.benchmark}: {report.problems} problems x {report.samples_per_problem} "
        f"samples: {scores} ({report.seconds:.1f} s)"
    )
    print(f"written: {cfg.eval.out_dir}")
    return 0


def _run(cfg: Any, *, verbose: bool) -> int:
    """Train; third-party output goes to RUN_DIR/logs/r1-train.log unless ``verbose``, so the
    terminal shows the progress, the table, the plots and, on failure, the one-line cause."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r1_train.console import LOG_FILE, QuietRun
    from r1_train.reaper import start_reaper
    from tangram_core.telemetry import configure_telemetry

    # stops the engine, Ray and the sandboxes if this process dies without closing them; started
    # before the output is captured, so that its report reaches the terminal
    start_reaper()
    log = Path(cfg.run.out_dir) / LOG_FILE
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "") + os.environ.get(
        "OTEL_METRICS_EXPORTER", ""
    )
    verbose = verbose or "console" in exporters  # spans asked for on the console stay there
    with QuietRun(log, verbose=verbose) as term:
        if not verbose:
            print(f"r1-train: logs in {log} (--verbose shows them here)", file=term.err)
        telemetry = configure_telemetry(service_name="r1-train")
        run_failures = _run_failures()  # imported here: they pull in torch
        from r1_train.tasks import TaskDataError
        from r1_train.trainer import Trainer

        trainer: Trainer
        try:
            if cfg.cluster is not None:
                from r1_train.cluster_trainer import ClusterTrainer

                trainer = ClusterTrainer(cfg)
            else:
                trainer = Trainer(cfg)
        except TaskDataError as exc:  # bad data (file and row), found before anything starts
            print(f"r1-train: {exc}", file=term.err)
            telemetry.shutdown()
            return 2
        except run_failures as exc:  # a cluster that cannot hold the run, a rank that died
            print(f"r1-train: the run failed to start: {type(exc).__name__}: {exc}", file=term.err)
            telemetry.shutdown()
            return 1
        try:
            results = asyncio.run(trainer.train())
        except run_failures as exc:
            # the messages name the step, the task or the path, and what to do; no traceback
            print(f"r1-train: the run failed: {type(exc).__name__}: {exc}", file=term.err)
            return 1
        finally:
            trainer.close()
            telemetry.shutdown()
    print_table([{"step": r.step, **r.metrics} for r in results])
    from r1_train.metrics import plot_run

    for path in plot_run(cfg.run.out_dir):
        print(f"plot: {path}")
    return 0


def _offline(
    args: argparse.Namespace,
    command: str,
    load: Callable[[Path | None, list[str]], Any],
    train: Callable[[Any], list[dict[str, Any]]],
    data_errors: tuple[type[BaseException], ...],
    label: Callable[[Any], str] | None = None,
) -> int:
    """``r1-train sft`` and ``r1-train distill``: a bad config or data exits 2 (the file and
    row named), before the model loads; a checkpoint that cannot be written exits 1."""
    from r1_train.config import ConfigError

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"r1-train {command}: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from r1_train.checkpoint import CheckpointWriteFailed
    from tangram_core.telemetry import configure_telemetry

    telemetry = configure_telemetry(service_name="r1-train")
    try:
        rows = train(cfg)
    except (*data_errors, ConfigError) as exc:  # bad data, a prompt that cannot fit
        print(f"r1-train {command}: {exc}", file=sys.stderr)
        return 2
    except CheckpointWriteFailed as exc:
        print(f"r1-train {command}: the run failed: {exc}", file=sys.stderr)
        return 1
    finally:
        telemetry.shutdown()
    if rows:
        first, last = rows[0], rows[-1]
        print(
            f"{label(cfg) if label else command}: steps {first['step']}..{last['step']}: loss "
            f"{first['loss']:.4f} -> {last['loss']:.4f}; checkpoints in {cfg.run.out_dir}"
        )
    return 0


def _sft(args: argparse.Namespace) -> int:
    from r1_train.sft import SFTDataError, load_sft_config, train_sft

    return _offline(args, "sft", load_sft_config, train_sft, (SFTDataError,))


def _distill(args: argparse.Namespace) -> int:
    from r1_train.distill import load_distill_config, train_distill
    from r1_train.sft import SFTDataError  # distill's data errors are its subclass

    return _offline(
        args,
        "distill",
        load_distill_config,
        train_distill,
        (SFTDataError,),
        label=lambda cfg: f"distill ({cfg.distill.loss})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "sft":
        return _sft(args)
    if args.command == "sample":
        from r1_train.sample import cli_main as sample_main

        return sample_main(args)
    if args.command == "distill":
        return _distill(args)
    if args.command == "plot":
        from r1_train.metrics import plot_run

        try:
            written = plot_run(args.run_dir, args.out)
        except FileNotFoundError as exc:
            print(f"r1-train plot: {exc}", file=sys.stderr)
            return 2
        for path in written:
            print(path)
        return 0

    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        # Every rank would start its own vLLM, Ray, sandboxes and rewards, and train alone.
        print(
            f"r1-train: launched as one of {world} ranks (WORLD_SIZE={world}); `r1-train run` "
            "trains in one process. The data-parallel update is r1_train.distributed "
            "(FSDP2 under torchrun, see the README's Multi-GPU section). To train on several "
            "processes or nodes, run once without torchrun and set cluster.trainer.ranks "
            "(trainer ranks as Ray actors; see the README's Cluster section).",
            file=sys.stderr,
        )
        return 2
    from r1_train.config import ConfigError, load_config

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"r1-train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    return _run(cfg, verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
