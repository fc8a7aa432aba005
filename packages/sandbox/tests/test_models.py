"""Request validation and judging rules: the edge where user input becomes a verdict."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tangram_sandbox.models import (
    Limits,
    RunRequest,
    RunTestsRequest,
    outputs_match,
    values_match,
)


def test_outputs_match_ignores_trailing_whitespace_only() -> None:
    assert outputs_match("1 2\n3\n\n", "1 2  \n3")
    assert not outputs_match("1 2\n3", "1 2\n4")
    assert not outputs_match("12", "1 2")
    assert not outputs_match("", "0")


def test_values_match_is_json_equality_with_float_tolerance() -> None:
    assert values_match([1, 2.0000001], (1, 2.0))
    assert values_match({"a": [0.1 + 0.2]}, {"a": [0.3]})
    assert not values_match(1.1, 1.0)
    assert not values_match(True, 1), "bool and int are different answers"
    assert not values_match([1, 2], [1, 2, 3])
    assert not values_match({"a": 1}, {"b": 1})


def test_limits_clamp_to_server_maximum() -> None:
    wanted = Limits(wall_s=100, memory_mb=64_000, processes=4000)
    got = wanted.clamp(Limits(wall_s=5, memory_mb=512, processes=16))
    assert (got.wall_s, got.memory_mb, got.processes) == (5, 512, 16)
    assert got.effective_cpu_s() == 5


def test_unknown_field_is_rejected_by_name() -> None:
    with pytest.raises(ValidationError, match="timeout_s"):
        RunRequest(code="print(1)", timeout_s=3)  # type: ignore[call-arg]


def test_bad_file_names_and_content_are_rejected() -> None:
    with pytest.raises(ValidationError, match="normal form"):
        RunRequest(code="", files={"../etc/passwd": ""})
    with pytest.raises(ValidationError, match="reserved"):
        RunRequest(code="", files={"main.py": ""})
    with pytest.raises(ValidationError, match="base64"):
        RunRequest(code="", files={"a.txt": "not base64!"})


def test_call_tests_need_python() -> None:
    with pytest.raises(ValidationError, match="language='python'"):
        RunTestsRequest(code="", language="bash", tests=[{"fn": "f", "expected": 1}])
    with pytest.raises(ValidationError, match="at least 1"):
        RunTestsRequest(code="", tests=[])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (".", "'.' or '..' component"),
        ("./a.txt", "'.' or '..' component"),
        ("a//b", "empty, '.' or '..' component"),
        ("dir/", "empty, '.' or '..' component"),
        ("../etc/passwd", "'..' component"),
        ("/etc/passwd", "relative to the working directory"),
        ("a\x00b", "NUL"),
        ("x" * 256, "longer than 255 bytes"),
        ("/".join(["d" * 200] * 21), "longer than 4096 bytes"),
        ("", "must not be empty"),
        ("main.py", "reserved"),
    ],
)
def test_bad_file_names_are_refused_naming_the_field_and_the_rule(name: str, why: str) -> None:
    """A bad name is the client's mistake (a 422 that names it), never a failure inside the
    sandbox, which clients would take for the infrastructure's and retry."""
    with pytest.raises(ValidationError, match="files") as info:
        RunRequest(code="print(1)", files={name: "eA=="})
    assert why in str(info.value)
    if name != "main.py":
        with pytest.raises(ValidationError, match="fetch_files"):
            RunRequest(code="print(1)", fetch_files=[name])


def test_a_name_cannot_be_both_a_file_and_a_directory() -> None:
    with pytest.raises(ValidationError, match="'a' cannot be both a file and a directory"):
        RunTestsRequest(
            code="print(1)", files={"a": "eA==", "a/b": "eA=="}, tests=[{"expected_stdout": "1"}]
        )
    ok = RunRequest(code="print(1)", files={"a/b": "eA==", "a/c/d": "eA==", "ab": "eA=="})
    assert set(ok.files) == {"a/b", "a/c/d", "ab"}


def test_compile_timeout_s_must_be_positive() -> None:
    with pytest.raises(ValidationError, match="compile_timeout_s"):
        RunRequest(code="int main(){}", language="cpp", compile_timeout_s=0)
    assert RunRequest(code="x", compile_timeout_s=0.5).compile_timeout_s == 0.5
