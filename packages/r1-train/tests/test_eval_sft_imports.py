"""``r1-train eval`` and ``r1-train sft`` answer a bad config without loading torch or vLLM."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("module", ["r1_train.evaluate", "r1_train.sft", "r1_train.humaneval"])
def test_reading_the_config_imports_no_torch(imported_modules, module: str) -> None:
    loaded = imported_modules(module)
    assert not loaded & {"torch", "vllm", "ray", "transformers"}, sorted(loaded)
