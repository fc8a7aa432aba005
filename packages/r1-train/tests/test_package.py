"""r1_train's import contract."""


def test_import_does_not_start_engines(imported_modules):
    # `python -m r1_train --help` must answer instantly: vLLM and Ray load only when used.
    loaded = imported_modules("r1_train")
    assert not loaded & {"vllm", "ray"}, loaded


def test_reading_a_config_imports_no_torch(imported_modules):
    # `--print-config` and a bad override's error answer without loading torch (seconds)
    loaded = imported_modules("r1_train.config")
    assert "torch" not in loaded, sorted(loaded)
