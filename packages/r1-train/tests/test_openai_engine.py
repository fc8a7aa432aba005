"""The OpenAI-server rollout engine against a real vLLM API server (tiny model, CPU)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from r1_train.config import RolloutConfig
from r1_train.rollout import GenRequest, OpenAIServerEngine, checkpoint_tensors, weight_fingerprint

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", HF_HUB_OFFLINE="1")
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0",
            "--worker-extension-cls", "r1_train.vllm_sync.WeightSyncExtension",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({proc.returncode}); see {log.name}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("the vLLM server did not become healthy") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def test_generate_and_sync_through_the_server(server: str, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = OpenAIServerEngine(server, RolloutConfig(max_total_tokens=256))
    try:
        prompt = list(range(5, 25))
        a, b, c = engine.generate(
            [
                GenRequest(prompt, 8, seed=1),
                GenRequest(prompt, 8, seed=2),
                GenRequest(prompt, 8, seed=1),
            ]
        )
        assert len(a.token_ids) == len(a.logprobs) == 8  # random model: no EOS in 8 tokens
        assert a.token_ids == c.token_ids  # per-request seeds
        assert a.token_ids != b.token_ids
        assert all(lp <= 0 for lp in a.logprobs)

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        state = checkpoint_tensors(model)
        assert engine.sync_weights(state, 1) == pytest.approx(weight_fingerprint(state), rel=1e-9)
        (after,) = engine.generate([GenRequest(prompt, 8, seed=1)])
        assert after.token_ids != a.token_ids or after.logprobs != a.logprobs
    finally:
        engine.close()


def test_an_unreachable_server_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"GET http://127\.0\.0\.1:9/v1/models"):
        OpenAIServerEngine("http://127.0.0.1:9", RolloutConfig(), timeout_s=2)
