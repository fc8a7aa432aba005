"""``r1-train sft`` on the tiny model: assistant tokens only, the loss falls, checkpoints and
metrics as ``run`` writes them, micro-batching does not change the gradient, bad rows are
refused with the file and row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1_train.checkpoint import latest_checkpoint
from r1_train.cli import main
from r1_train.sft import (
    Conversation,
    load_examples,
    load_sft_config,
    pack,
    sft_loss_and_backward,
    tokenise,
)

CHATS = [
    [("user", "What is 2 + 3?"), ("assistant", "5")],
    [("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "Paris")],
    [("user", "Say hi"), ("assistant", "hi"), ("user", "Again"), ("assistant", "hi hi")],
    [("user", "Colour of the sky?"), ("assistant", "blue")],
]


def _rows(chats: list[list[tuple[str, str]]]) -> list[dict]:
    return [{"messages": [{"role": r, "content": c} for r, c in chat]} for chat in chats]


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_only_assistant_tokens_are_trained(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    conv = Conversation.model_validate(_rows(CHATS)[2])
    ids, trained = tokenise(conv, tok)
    text = tok.decode([i for i, t in zip(ids, trained, strict=True) if t])
    # each reply with its end-of-turn marker; no role header, no user text
    assert text == "hi<|im_end|>\nhi hi<|im_end|>\n"
    assert tok.decode(ids) == tok.apply_chat_template(
        [m.model_dump() for m in conv.messages], tokenize=False
    )


def test_micro_batches_give_the_same_gradient(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_examples(_write(tmp_path / "d.jsonl", _rows(CHATS)), tok, 256)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    grads = []
    for micro in (1, 4):
        model.zero_grad()
        loss, n = sft_loss_and_backward(model, examples, micro, 0)
        grads.append((loss, n, torch.cat([p.grad.flatten() for p in model.parameters()])))
    (l1, n1, g1), (l4, n4, g4) = grads
    assert n1 == n4 > 0
    assert l1 == pytest.approx(l4, rel=1e-5)
    assert torch.allclose(g1, g4, atol=1e-6)


def test_packing_keeps_whole_conversations(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = load_examples(_write(tmp_path / "d.jsonl", _rows(CHATS)), tok, 256)
    longest = max(len(e.ids) for e in examples)
    packed = pack(examples, 2 * longest)
    assert len(packed) < len(examples)
    assert all(len(p.ids) <= 2 * longest for p in packed)
    assert sum(len(p.ids) for p in packed) == sum(len(e.ids) for e in examples)
    assert sum(map(sum, (p.trained for p in packed))) == sum(sum(e.trained) for e in examples)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_steps_reduce_the_loss(tiny_model_dir: Path, tmp_path: Path, packing, capsys) -> None:
    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    out = tmp_path / "run"
    argv = ["sft", f"model.path={tiny_model_dir}", "model.dtype=float32", f"sft.path={data}"]
    argv += ["sft.batch_size=4", f"sft.packing={str(packing).lower()}", "optim.lr=3e-3"]
    argv += ["optim.micro_batch_size=2", "run.steps=6", "run.save_every=3", f"run.out_dir={out}"]
    argv += ["run.tensorboard=false", "run.progress=false"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert all(r["trained_tokens"] > 0 and r["grad_norm"] > 0 for r in rows)
    assert latest_checkpoint(out) == out / "checkpoint-000006"
    assert (out / "checkpoint-000003" / "trainer_state.pt").is_file()
    # the checkpoint is a loadable HF model
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-000006")
    assert "loss" in capsys.readouterr().out


def test_resume_continues_after_the_last_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    out = tmp_path / "run"
    base = [f"model.path={tiny_model_dir}", "model.dtype=float32", f"sft.path={data}"]
    base += ["sft.batch_size=2", f"run.out_dir={out}", "run.tensorboard=false"]
    base += ["run.progress=false", "run.save_every=2"]
    assert main(["sft", *base, "run.steps=2"]) == 0
    assert main(["sft", "--resume", *base, "run.steps=4"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert latest_checkpoint(out) == out / "checkpoint-000004"


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ("[1, 2", "not valid JSON"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role: Input should"),
        ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        ({"prompt": "x", "messages": []}, "messages: List should"),
        (
            {"messages": [{"role": "assistant", "content": "x " * 400}]},
            "tokens, more than sft.max_length (256)",
        ),
    ],
)
def test_bad_rows_are_refused_with_file_and_row(
    tiny_model_dir: Path, tmp_path: Path, capsys, row, says
) -> None:
    data = _write(tmp_path / "bad.jsonl", [_rows(CHATS)[0], row])
    argv = ["sft", f"model.path={tiny_model_dir}", f"sft.path={data}", "sft.max_length=256"]
    assert main([*argv, f"run.out_dir={tmp_path / 'run'}", "run.tensorboard=false"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: row 2: " in err
    assert says in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_config_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    from r1_train.config import ConfigError

    with pytest.raises(ConfigError, match=r"sft\.path .* does not exist"):
        load_sft_config(None, [f"model.path={tiny_model_dir}", f"sft.path={tmp_path / 'x'}"])
    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    cfg = load_sft_config(None, [f"model.path={tiny_model_dir}", f"sft.path={data}", "run.steps=3"])
    assert (cfg.optim.lr, cfg.run.out_dir, cfg.run.steps) == (1e-5, Path("runs/sft"), 3)
    cfg = load_sft_config(None, [f"model.path={tiny_model_dir}", f"sft.path={data}", "optim.lr=2"])
    assert cfg.optim.lr == 2
    with pytest.raises(ConfigError, match=r"sft\.batchsize: Extra inputs"):
        load_sft_config(None, [f"model.path={tiny_model_dir}", "sft.batchsize=3"])


@pytest.mark.slow
def test_sft_evaluates_every_n_steps_with_vllm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The trained weights reach a vLLM engine and HumanEval runs on them in the sandbox; the
    scores join the step's metrics (tiny-llama scores 0: the plumbing is what is checked)."""
    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    out = tmp_path / "run"
    argv = ["sft", f"model.path={tiny_model_dir}", "model.dtype=float32", f"sft.path={data}"]
    argv += ["sft.batch_size=2", "sft.eval_every=2", "run.steps=3", f"run.out_dir={out}"]
    argv += ["run.tensorboard=false", "run.progress=false", "rollout.max_new_tokens=16"]
    argv += ["rollout.max_total_tokens=1024", "eval.limit=2", "eval.samples=2", "eval.k=[1,2]"]
    argv += ["eval.progress=false"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "eval/pass@1" in r]
    assert evaluated == [1, 2]  # every 2 steps, and after the last
    for step in (2, 3):
        report = json.loads((out / "eval" / f"step-{step:06d}" / "eval.json").read_text())
        assert (report["problems"], report["samples_per_problem"]) == (2, 2)
        row = rows[step - 1]
        assert row["eval/pass@2"] == report["scores"]["pass@2"]
        assert row["eval/accuracy"] == report["scores"]["accuracy"]


def test_eval_every_needs_an_eval_section(tiny_model_dir: Path, tmp_path: Path) -> None:
    from r1_train.config import ConfigError

    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    with pytest.raises(ConfigError, match=r"sft\.eval_every \(5\) needs an eval section"):
        load_sft_config(
            None, [f"model.path={tiny_model_dir}", f"sft.path={data}", "sft.eval_every=5"]
        )


@pytest.mark.slow
def test_fsdp_sft_equals_the_one_process_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two CPU ranks (gloo) under torchrun, FSDP2, against one process on the same data: the
    same losses and, after two AdamW steps, the same weights. 3 conversations a step over 2
    ranks: one rank runs a pass of weight 0 to keep the collectives in step. AdamW's eps is 1
    for the reason the README's Multi-GPU section gives."""
    from safetensors.torch import load_file

    data = _write(tmp_path / "chats.jsonl", _rows(CHATS))
    common = [f"model.path={tiny_model_dir}", "model.dtype=float32", f"sft.path={data}"]
    common += ["sft.batch_size=3", "optim.micro_batch_size=1", "optim.lr=0.05"]
    common += ["optim.adam_epsilon=1.0", "optim.grad_clip=1e9", "run.steps=2"]
    common += ["run.tensorboard=false", "run.progress=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sft", *common, f"run.out_dir={one}"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, "-m", "r1_train", "sft", *common, f"run.out_dir={two}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [
        [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    ]
    for a, b in zip(*rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["trained_tokens"] == a["trained_tokens"]
    w1 = load_file(one / "checkpoint-000002" / "model.safetensors")
    w2 = load_file(two / "checkpoint-000002" / "model.safetensors")
    assert set(w2) <= set(w1)
    for name, tensor in w2.items():
        assert torch.allclose(tensor, w1[name], atol=1e-5), name
    AutoModelForCausalLM.from_pretrained(two / "checkpoint-000002")
