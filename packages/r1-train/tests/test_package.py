"""r1_train's import contract."""


def test_import_does_not_start_engines(imported_modules):
    # `python -m r1_train --help` must answer instantly: vLLM and Ray load only when used.
    loaded = imported_modules("r1_train")
    assert not loaded & {"vllm", "ray"}, loaded
