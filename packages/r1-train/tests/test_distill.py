"""``r1-train distill``'s maths and refusals, fast: every loss against a direct PyTorch
computation and TRL's ``GKDTrainer.generalized_jsd_loss``, the masking and micro-batching of
the step's loss on the tiny model, and the config, data and tokenizer errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from r1_train.config import ConfigError
from r1_train.distill import (
    DistillDataError,
    apply_trainable,
    check_same_vocabulary,
    distill_loss_and_backward,
    load_distill_config,
    load_sequences,
)
from r1_train.distill_loss import token_divergence
from r1_train.sft import Example, SFTDataError


def _logits(seed: int, shape: tuple[int, ...] = (2, 5, 11)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, written out from the definition."""
    p = torch.softmax(p_logits, -1)
    return (p * (torch.log(p) - torch.log(torch.softmax(q_logits, -1)))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_forward_reverse_and_mix_match_the_definitions(temperature: float) -> None:
    s, t = _logits(0), _logits(1)
    st, tt = s / temperature, t / temperature
    fwd = token_divergence(s, t, loss="forward_kl", temperature=temperature)
    rev = token_divergence(s, t, loss="reverse_kl", temperature=temperature)
    mix = token_divergence(s, t, loss="mix", beta=0.3, temperature=temperature)
    torch.testing.assert_close(fwd, _kl(tt, st).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rev, _kl(st, tt).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mix, (0.7 * _kl(tt, st) + 0.3 * _kl(st, tt)).float())
    assert fwd.shape == (2, 5)
    assert bool((fwd > 0).all())
    assert not torch.allclose(fwd, rev)
    # identical distributions: every divergence is 0
    for loss in ("forward_kl", "reverse_kl", "mix", "jsd"):
        assert float(token_divergence(s, s, loss=loss).abs().max()) < 1e-6


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_jsd_equals_trl_loss_and_gradient(beta: float, temperature: float) -> None:
    """TRL's ``batchmean`` over labelled tokens = our per-token sum over the trained tokens
    divided by their count; the student's gradient is the same too."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    t = _logits(1).float()
    labels = torch.tensor([[1, 2, -100, 3, -100], [-100, 4, 5, 6, 7]])
    mask = labels != -100
    ours_s = _logits(0).float().requires_grad_(True)
    ours = token_divergence(ours_s, t, loss="jsd", beta=beta, temperature=temperature)
    ours = (ours * mask).sum() / mask.sum()
    ours.backward()
    trl_s = _logits(0).float().requires_grad_(True)
    theirs = GKDTrainer.generalized_jsd_loss(
        trl_s, t, labels=labels, beta=beta, temperature=temperature
    )
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_s.grad, trl_s.grad, rtol=1e-4, atol=1e-7)


def test_jsd_endpoints_are_the_kls_and_bad_arguments_are_refused() -> None:
    s, t = _logits(2), _logits(3)
    fwd = token_divergence(s, t, loss="forward_kl")
    rev = token_divergence(s, t, loss="reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, loss="jsd", beta=0.0), fwd)
    torch.testing.assert_close(token_divergence(s, t, loss="jsd", beta=1.0), rev)
    with pytest.raises(ValueError, match=r"temperature \(0\) must be > 0"):
        token_divergence(s, t, loss="forward_kl", temperature=0)
    with pytest.raises(ValueError, match=r"beta \(1.5\) must be within"):
        token_divergence(s, t, loss="mix", beta=1.5)
    with pytest.raises(ValueError, match="share a vocabulary"):
        token_divergence(s, t[..., :7], loss="forward_kl")


def _rows() -> list[Example]:
    """Three rows of different lengths; only the marked positions are distilled."""
    specs = [(9, [4, 5, 6, 7, 8]), (6, [2, 3]), (12, [3, 4, 5, 6, 7, 8, 9, 10, 11])]
    out = []
    for n, (length, trained) in enumerate(specs):
        ids = [(17 * n + 5 * p + 3) % 900 + 10 for p in range(length)]
        out.append(Example(ids, [p in trained for p in range(length)], n + 1))
    return out


def _student_and_teacher(tiny_model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a teacher that differs from the student
        gen = torch.Generator().manual_seed(7)
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return student, teacher.eval().requires_grad_(False)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_step_loss_is_masked_and_independent_of_micro_batches(
    tiny_model_dir: Path, loss: str
) -> None:
    student, teacher = _student_and_teacher(tiny_model_dir)
    rows = _rows()
    # the reference: each row alone, every position, then the trained ones picked out
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r.ids])
            div = token_divergence(
                student(ids).logits[0, :-1], teacher(ids).logits[0, :-1], loss=loss, beta=0.5
            )
            keep = torch.tensor(r.trained[1:])
            total += div[keep].sum()
            count += int(keep.sum())
    grads = []
    for micro in (1, 2, 3):
        student.zero_grad()
        value, n = distill_loss_and_backward(student, teacher, rows, micro, 0, loss=loss)  # type: ignore[arg-type]
        assert n == count == 16
        assert value == pytest.approx(float(total / count), rel=1e-5)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert float(grads[0].abs().max()) > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in teacher.parameters())


def test_trainable_globs_freeze_the_rest_and_refuse_a_glob_matching_nothing(
    tiny_model_dir: Path,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained, total = apply_trainable(model, ["*.self_attn.q_proj.*", "model.norm.weight"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names
    assert all(".self_attn.q_proj." in n or n == "model.norm.weight" for n in names)
    assert 0 < trained < total
    with pytest.raises(ConfigError, match=r"glob '\*gate_proj_typo\*' matches no parameter") as e:
        apply_trainable(model, ["*q_proj*", "*gate_proj_typo*"])
    assert "model.embed_tokens.weight" in str(e.value)  # a few names to choose from


def _cfg(tmp_path: Path, tiny: Path, *extra: str):  # type: ignore[no-untyped-def]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a story.\n")
    base = [f"model.path={tiny}", f"teacher.path={tiny}"]
    return load_distill_config(None, [*base, *extra] or [*base, f"distill.prompts={prompts}"])


def test_config_errors_state_the_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me a story.\n")
    p = f"distill.prompts={prompts}"
    cfg = _cfg(tmp_path, tiny_model_dir, p, "distill.loss=jsd")
    assert (cfg.distill.mix_beta, cfg.optim.lr, cfg.run.out_dir) == (
        0.5,
        1e-5,
        Path("runs/distill"),
    )
    with pytest.raises(ConfigError, match=r"distill.beta \(0.3\) only applies to loss mix or jsd"):
        _cfg(tmp_path, tiny_model_dir, p, "distill.beta=0.3")
    with pytest.raises(ConfigError, match="give exactly one source of sequences, not none"):
        _cfg(tmp_path, tiny_model_dir, "run.steps=2")
    with pytest.raises(ConfigError, match=r"not \['distill.prompts', 'task'\]"):
        _cfg(tmp_path, tiny_model_dir, p, "task.kind=arithmetic")
    with pytest.raises(ConfigError, match=r"distill.path .*nope.jsonl' does not exist"):
        _cfg(tmp_path, tiny_model_dir, f"distill.path={tmp_path / 'nope.jsonl'}")
    with pytest.raises(ConfigError, match=r"distill\.lmbda: Input should be less than or equal"):
        _cfg(tmp_path, tiny_model_dir, p, "distill.lmbda=2")
    with pytest.raises(ConfigError, match="teacher: Field required"):
        load_distill_config(None, [f"model.path={tiny_model_dir}", p])


def test_tokenizer_mismatch_names_both_models(tiny_model_dir: Path, smollm2_dir: Path) -> None:
    with pytest.raises(DistillDataError) as e:
        check_same_vocabulary(tiny_model_dir, smollm2_dir)
    assert str(tiny_model_dir) in str(e.value)
    assert str(smollm2_dir) in str(e.value)
    assert "different tokenizers" in str(e.value)
    assert check_same_vocabulary(tiny_model_dir, tiny_model_dir) is not None


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ("{not json", "row 2: "),
        ({"prompt_ids": [1, 2]}, "row 2: completion_ids: Field required"),
        ({"prompt_ids": [1], "completion_ids": [], "text": ""}, "row 2: completion_ids: List"),
        ({"prompt_ids": [1], "completion_ids": [99999]}, "row 2: a token id outside"),
        ({"prompt_ids": [1], "completion_ids": [2], "extra": 1}, "row 2: extra: Extra inputs"),
        ({"prompt_ids": [1] * 40, "completion_ids": [2]}, "41 tokens, more than distill.max_"),
    ],
)
def test_bad_token_rows_name_the_file_and_row(
    tiny_model_dir: Path, tmp_path: Path, row: object, says: str
) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "rows.jsonl"
    good = {"prompt_ids": [5, 6], "completion_ids": [7, 8]}
    path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) else json.dumps(row)))
    with pytest.raises(SFTDataError, match=f"{path}: ") as e:
        load_sequences(path, tok, 32)
    assert says in str(e.value)
    path.write_text(json.dumps(good) + "\n")
    (ex,) = load_sequences(path, tok, 32)
    assert (ex.ids, ex.trained) == ([5, 6, 7, 8], [False, False, True, True])


def test_prompts_come_from_a_file_or_a_task(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the teacher is asked to continue: file lines as they are (plain) or through the
    chat template, JSONL rows, or a task section's prompts as training renders them."""
    from r1_train.distill import prompt_texts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tmp_path / "p.txt"
    text.write_text("Tell a story.\n\nDescribe the sea.\n")
    base = [f"model.path={tiny_model_dir}", f"teacher.path={tiny_model_dir}"]
    cfg = load_distill_config(None, [*base, f"distill.prompts={text}", "distill.template=plain"])
    assert prompt_texts(cfg, tok) == (str(text), ["Tell a story.", "Describe the sea."])
    cfg = load_distill_config(None, [*base, f"distill.prompts={text}"])
    _, chat = prompt_texts(cfg, tok)
    assert chat[0] == "<|im_start|>user\nTell a story.<|im_end|>\n<|im_start|>assistant\n"
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "Hi"}\n{"prompt": 3}\n')
    cfg = load_distill_config(None, [*base, f"distill.prompts={rows}"])
    with pytest.raises(DistillDataError, match=r"p\.jsonl: row 2: needs a string 'prompt'"):
        prompt_texts(cfg, tok)
    cfg = load_distill_config(None, [*base, "task.kind=arithmetic", "task.size=3"])
    where, prompts = prompt_texts(cfg, tok)
    assert where == "task arithmetic"
    assert len(prompts) == 3
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)
