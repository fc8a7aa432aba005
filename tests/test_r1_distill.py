"""``r1-train distill`` end to end on tiny models: the tiny Llama teacher samples its own data
on vLLM, the tiny HySparse student (same tokenizer) learns its distribution with only its
gates and attention projections trainable, checkpoints and metrics as ``sft`` writes them,
``--resume`` continues on the same samples, and on-policy rows are sampled by the student."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1_train.checkpoint import latest_checkpoint
from r1_train.cli import main
from r1_train.distill import SAMPLES_FILE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The lighthouse keeper", "Once upon a time", "The answer is", "In the harbour"]
TRAINABLE = json.dumps(
    [f"*.{n}.*" for n in ("branch_gate", "swa_k_proj", "swa_v_proj", "q_proj", "o_proj")]
)


@pytest.fixture(scope="module")
def tiny_hysparse() -> Path:
    pytest.importorskip("hysparse_vllm")
    sys.path.insert(0, str(ROOT / "tools" / "models"))
    from build_models import ensure

    return Path(ensure("tiny-hysparse"))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_teacher_samples_then_student_learns_and_resumes(
    tiny_model_dir: Path, tiny_hysparse: Path, tmp_path: Path, capsys
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    argv = ["distill", f"model.path={tiny_hysparse}", f"teacher.path={tiny_model_dir}"]
    argv += [f"distill.prompts={prompts}", "distill.template=plain", "distill.samples_per_prompt=2"]
    argv += ["distill.batch_size=4", f"distill.trainable={TRAINABLE}", "distill.loss=jsd"]
    argv += ["model.dtype=float32", "optim.lr=3e-3", "optim.micro_batch_size=2"]
    argv += ["rollout.max_new_tokens=24", "rollout.max_total_tokens=128", f"run.out_dir={out}"]
    argv += ["run.tensorboard=false", "run.progress=false", "run.save_every=3"]
    assert main([*argv, "run.steps=6"]) == 0
    assert "distill (jsd): steps 0..5" in capsys.readouterr().out

    samples = [json.loads(x) for x in (out / SAMPLES_FILE).read_text().splitlines()]
    assert len(samples) == 8  # 4 prompts x 2, every continuation sampled by the teacher
    assert all(0 < len(s["completion_ids"]) <= 24 for s in samples)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    assert all(r["trained_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["trained_params"] > 0

    # only the globbed parameters moved; the MLPs, norms and embeddings are as they were
    before = load_file(str(tiny_hysparse / "model.safetensors"))
    after = load_file(str(out / "checkpoint-000006" / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".branch_gate." in k for k in moved)
    assert any(".swa_k_proj." in k for k in moved)
    assert not any(".mlp." in k or "norm" in k or "embed" in k for k in moved)

    # resume from step 3 with the same samples file: the same steps, the same losses
    first = {r["step"]: r["loss"] for r in rows}
    (out / "checkpoint-000006").rename(tmp_path / "done-6")
    assert main(["distill", "--resume", *argv[1:], "run.steps=6"]) == 0
    again = _metrics(out)
    assert [r["step"] for r in again] == list(range(6))
    for r in again[3:]:
        assert r["loss"] == pytest.approx(first[r["step"]], rel=1e-4)
    assert latest_checkpoint(out) == out / "checkpoint-000006"


def test_on_policy_rows_come_from_the_student(
    tiny_model_dir: Path, tiny_hysparse: Path, tmp_path: Path
) -> None:
    """lmbda 0.5 with a token-row file: half of each step's rows are the student's own
    continuations (HF generate on the HySparse reference), distilled with reverse KL."""
    data = tmp_path / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt_ids": [5 + i, 9, 12], "completion_ids": [20 + i, 30, 40, 50]})
            + "\n"
            for i in range(4)
        )
    )
    out = tmp_path / "run"
    argv = ["distill", f"model.path={tiny_hysparse}", f"teacher.path={tiny_model_dir}"]
    argv += [f"distill.path={data}", "distill.lmbda=0.5", "distill.loss=reverse_kl"]
    argv += ["distill.batch_size=4", "rollout.max_new_tokens=6", "model.dtype=float32"]
    argv += [f"run.out_dir={out}", "run.steps=2", "run.tensorboard=false", "run.progress=false"]
    assert main(argv) == 0
    rows = _metrics(out)
    assert [r["on_policy_rows"] for r in rows] == [2, 2]
    # two file rows of 4 trained tokens and two sampled rows of up to 6
    assert all(8 < r["trained_tokens"] <= 8 + 12 for r in rows)


def test_bad_data_and_mismatched_tokenizers_exit_2(
    tiny_model_dir: Path, smollm2_dir: Path, tmp_path: Path, capsys
) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    base = ["distill", f"model.path={tiny_model_dir}", f"distill.path={data}"]
    base += [f"run.out_dir={tmp_path / 'run'}", "run.tensorboard=false"]
    assert main([*base, f"teacher.path={tiny_model_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: row 1: " in err
    assert "no assistant message" in err
    assert main([*base, f"teacher.path={smollm2_dir}"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err
    assert str(smollm2_dir) in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
