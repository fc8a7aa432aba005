"""tangram_sandbox's import contract."""


def test_import_is_light(imported_modules):
    # Zygote workers fork from a process that imports this package: whatever it imports is
    # copied into every sandboxed child, so Ray and torch must stay out.
    loaded = imported_modules("tangram_sandbox")
    assert "tangram_core" in loaded or "tangram_sandbox" in loaded
    assert not loaded & {"ray", "torch", "vllm", "transformers"}, loaded
