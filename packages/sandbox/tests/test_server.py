"""The HTTP API on a real pool: our endpoints and SandboxFusion's ``/run_code`` shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tangram_sandbox.config import PoolConfig
from tangram_sandbox.server import build_app

pytestmark = pytest.mark.usefixtures("can_sandbox")


@pytest.fixture(scope="module")
def client(can_sandbox: None) -> Iterator[TestClient]:
    app = build_app(config=PoolConfig(min_workers=1, max_workers=2))
    with TestClient(app) as c:
        yield c


def test_run_code_answers_sandboxfusion_shape(client: TestClient) -> None:
    """The shape in brief; test_sandboxfusion.py compares every field, language by language."""
    py = {"language": "python"}
    ok = client.post("/run_code", json={"code": "print(input())", "stdin": "hi", **py}).json()
    assert ok["status"] == "Success"
    assert ok["run_result"]["status"] == "Finished"
    assert ok["run_result"]["stdout"] == "hi\n"
    assert ok["run_result"]["return_code"] == 0
    spin = {"code": "while True: pass", "run_timeout": 0.5, **py}
    tle = client.post("/run_code", json=spin).json()
    assert tle["status"] == "Failed"
    assert tle["run_result"]["status"] == "TimeLimitExceeded"
    assert tle["run_result"]["return_code"] is None
    bad = client.post("/run_code", json={"code": "int main( {", "language": "cpp"}).json()
    assert bad["status"] == "Failed"
    assert bad["compile_result"]["status"] == "Finished"
    assert bad["compile_result"]["return_code"] != 0
    assert bad["run_result"] is None


def test_unsupported_fields_and_languages_get_422_naming_them(client: TestClient) -> None:
    resp = client.post("/run_code", json={"code": "1", "language": "cobol"})
    assert resp.status_code == 422
    assert "language" in resp.text
    resp = client.post("/run_code", json={"code": "1", "language": "python", "extra_field": 1})
    assert resp.status_code == 422
    assert "extra_field" in resp.text


def test_run_and_run_tests_endpoints(client: TestClient) -> None:
    run = client.post("/run", json={"code": "print(2 + 2)"}).json()
    assert (run["status"], run["stdout"]) == ("ok", "4\n")
    tests = [{"stdin": str(i), "expected_stdout": str(i * i)} for i in range(5)]
    batch = client.post(
        "/run_tests", json={"code": "n = int(input()); print(n * n)", "tests": tests}
    ).json()
    assert (batch["status"], batch["passed"], batch["pass_fraction"]) == ("ok", 5, 1.0)


def test_health_and_capabilities(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["healthy"] is True
    assert health["workers"] >= 1
    caps = client.get("/capabilities").json()
    names = {layer["name"] for layer in caps["layers"]}
    assert {"seccomp", "pid_ns", "rlimits"} <= names
