"""hysparse_vllm's import contract."""


def test_import_is_free_of_vllm_and_tangram(imported_modules):
    # vLLM imports its general plugins in every engine and worker process, so the package import
    # must be cheap; and HySparse stands alone, so nothing of tangram may come with it.
    loaded = imported_modules("hysparse_vllm")
    assert not loaded & {"vllm", "torch", "ray"}, loaded
    assert not {m for m in loaded if m.startswith("tangram")}, loaded
