"""SandboxFusion's ``/run_code``, as verl sends it, against what SandboxFusion answers.

Real servers (uvicorn on loopback sockets) on a real pool. Every request is shaped as verl's
client sends it (``verl/utils/reward_score/sandbox_fusion/utils.py`` at volcengine/verl
b178a3cd, ``call_sandbox_api``: all eight fields, no ``Authorization`` header), from a client
address inside the server's allow-list, so the allow-list is exercised by every test.

The expected responses are written from SandboxFusion's own code and docs (bytedance/
SandboxFusion 469de084):
* ``sandbox/server/sandbox_api.py``: the request and response models, and
  ``parse_run_status`` (``Success`` when every step finished with return code 0; ``Failed``
  on a timeout or a non-zero return code, with an empty ``message``; ``SandboxError`` only
  when a step could not run, the one case with a message);
* ``sandbox/runners/types.py``: ``CommandRunResult`` (status, execution_time, return_code,
  stdout, stderr);
* ``sandbox/runners/base.py``: ``run_command_bare`` (a timeout is ``TimeLimitExceeded`` with
  no return code), ``run_commands`` (the compile step runs first and the program only when it
  finished with return code 0; fetched files that do not exist are left out) and
  ``restore_files`` (null contents are skipped; parent folders are created);
* ``sandbox/runners/major.py``: ``python file.py``, ``/bin/bash file.sh``, ``node file.js``
  and ``tsx file.ts`` run only; ``g++``, ``javac``, ``go build`` and ``rustc`` are compile
  steps, so ``compile_result`` is set; ``MAJOR_RUNNERS`` also names nodejs ``js`` and
  typescript ``ts``;
* ``docs/docs/docs/get-started.mdx`` and ``docs/docs/docs/how-to/run-code/
  upload-download-files.mdx``: the sample responses quoted below;
* ``sandbox/server/server.py``: ``GET /v1/ping`` answers ``"pong"``.

Ours adds three keys that SandboxFusion's clients ignore: ``stdout_truncated`` and
``stderr_truncated`` in each step, and ``files_truncated``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tangram_core.http.guard import GuardConfig, GuardStats, auth_headers
from tangram_sandbox.config import PoolConfig
from tangram_sandbox.models import Limits
from tangram_sandbox.pool import SandboxPool
from tangram_sandbox.server import build_app

pytestmark = pytest.mark.usefixtures("can_sandbox")

TOKEN = "fusion-test-token-0123456789abcdef"
ALLOWED = "127.0.0.64/28"  # 127.0.0.64 to 127.0.0.79
INSIDE = "127.0.0.65"
OUTSIDE = "127.0.0.100"
MAX_MEMORY_MB = 2048
FETCH_LIMIT = 4096  # the pool's max_limits.output_bytes bounds fetched files too
FAST = {"client_rate": 1e6, "client_burst": 1_000_000, "client_concurrency": 256}
GUARDS = {
    "fusion": GuardConfig(**FAST),
    # One slot, no queue, one request per client at a time: overload on demand.
    "tight": GuardConfig(
        max_in_flight=1,
        max_queue=0,
        client_concurrency=1,
        client_rate=1e6,
        client_burst=1_000_000,
    ),
}


# --- servers ---------------------------------------------------------------------------------


@dataclass
class Servers:
    urls: dict[str, str] = field(default_factory=dict)
    stats: dict[str, GuardStats] = field(default_factory=dict)
    pool: SandboxPool | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def servers(can_sandbox: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    import uvicorn

    out = Servers()
    ready = threading.Event()
    stop: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        config = PoolConfig(
            min_workers=2,
            max_workers=2,
            max_limits=Limits(
                wall_s=5, memory_mb=MAX_MEMORY_MB, processes=64, output_bytes=FETCH_LIMIT
            ),
            # A fresh compile cache: compile steps really compile (and time out) here.
            cache_dir=str(tmp_path_factory.mktemp("cpp-cache")),
        )
        async with SandboxPool(config) as pool:
            out.pool = pool
            servers = []
            for name, guard in GUARDS.items():
                port = _free_port()
                out.stats[name] = GuardStats()
                app = build_app(
                    pool=pool,
                    token=TOKEN,
                    guard=guard,
                    stats=out.stats[name],
                    allow_networks=[ALLOWED],
                )
                # As the CLI runs it: peers are told apart by address, never by a header.
                cfg = uvicorn.Config(
                    app, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False
                )
                servers.append(uvicorn.Server(cfg))
                out.urls[name] = f"http://127.0.0.1:{port}"
            tasks = [asyncio.create_task(s.serve()) for s in servers]
            while not all(s.started for s in servers):
                await asyncio.sleep(0.02)
            stop["event"] = asyncio.Event()
            stop["loop"] = asyncio.get_running_loop()
            ready.set()
            await stop["event"].wait()
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by the fixture below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60), "servers did not start"
    if failure:
        raise failure[0]
    yield out
    stop["loop"].call_soon_threadsafe(stop["event"].set)
    thread.join(60)


def client(source: str = INSIDE, headers: dict[str, str] | None = None) -> httpx.Client:
    """A client from ``source`` (its own loopback address); verl sends no token."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(transport=transport, timeout=60, headers=headers or {})


def verl_request(code: str, language: str, stdin: str | None = None, **fields: Any) -> Any:
    """The body verl's ``call_sandbox_api`` posts (utils.py, lines 101-112)."""
    return {
        "compile_timeout": 10,
        "run_timeout": 10,
        "code": code,
        "stdin": stdin,
        "memory_limit_MB": 1024,
        "language": language,
        "files": {},
        "fetch_files": [],
        **fields,
    }


def post(servers: Servers, body: dict[str, Any], source: str = INSIDE) -> dict[str, Any]:
    with client(source) as c:
        resp = c.post(servers.urls["fusion"] + "/run_code", json=body)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


# --- expected responses, as SandboxFusion builds them ----------------------------------------


class Seconds:
    """Any non-negative duration (``execution_time`` is measured, not predicted)."""

    def __init__(self, at_least: float = 0.0) -> None:
        self.at_least = at_least

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int | float) and other >= self.at_least

    def __repr__(self) -> str:
        return f"<seconds >= {self.at_least}>"


class Has:
    """A string containing ``part`` (tracebacks and compiler messages name temp paths)."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and self.part in other

    def __repr__(self) -> str:
        return f"<str containing {self.part!r}>"


class NonZero:
    """A return code other than 0 (each compiler has its own: go build says 2, gcc 1)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and not isinstance(other, bool) and other != 0

    def __repr__(self) -> str:
        return "<non-zero int>"


def finished(return_code: Any, stdout: str = "", stderr: Any = "") -> dict[str, Any]:
    """``CommandRunResult`` of a step that ran to its end (base.py, ``run_command_bare``)."""
    return {
        "status": "Finished",
        "execution_time": Seconds(),
        "return_code": return_code,
        "stdout": stdout,
        "stderr": stderr,
        **NOT_TRUNCATED,
    }


def time_limit_exceeded(at_least: float) -> dict[str, Any]:
    """``CommandRunResult`` of a step killed at its timeout: no return code."""
    return {
        "status": "TimeLimitExceeded",
        "execution_time": Seconds(at_least),
        "return_code": None,
        "stdout": "",
        "stderr": "",
        **NOT_TRUNCATED,
    }


NOT_TRUNCATED = {"stdout_truncated": False, "stderr_truncated": False}  # ours, not theirs
COMPILED = finished(0)  # g++ prints nothing on success (get-started.mdx, the C++ sample)


def response(
    status: str,
    run: dict[str, Any] | None = None,
    compiled: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
    files_truncated: list[str] | None = None,
) -> dict[str, Any]:
    """``RunCodeResponse`` (sandbox_api.py); ``message`` is empty unless ``SandboxError``."""
    return {
        "status": status,
        "message": "",
        "compile_result": compiled,
        "run_result": run,
        "executor_pod_name": None,
        "files": files or {},
        "files_truncated": files_truncated or [],  # ours
    }


#: Languages whose SandboxFusion runner has a compile step (``run_commands(compile, run, ...)``
#: in major.py: ``g++``, ``javac``, ``go build``, ``rustc``); ``c`` is ours (SandboxFusion has
#: none) and answers as C++ does. Node runs ``node``, TypeScript ``tsx``: run only.
COMPILED_LANGUAGES = {"cpp", "c", "java", "go", "rust"}


def compile_step(language: str) -> dict[str, Any] | None:
    return COMPILED if language in COMPILED_LANGUAGES else None


# --- one program per case and language -------------------------------------------------------

HELLO = {
    "python": 'print("Hello, world!")',  # get-started.mdx, the Python sample
    "cpp": '#include <iostream>\n\nint main() {\n    std::cout << "Hello, world!" << std::endl;'
    "\n    return 0;\n}\n",  # get-started.mdx, the C++ sample
    "bash": 'echo "Hello, world!"',
    "c": '#include <stdio.h>\nint main(void) { puts("Hello, world!"); return 0; }\n',
    "java": "public class Main {\n    public static void main(String[] args) {\n"
    '        System.out.println("Hello, world!");\n    }\n}\n',
    "nodejs": 'console.log("Hello, world!");',
    "typescript": 'const greeting: string = "Hello, world!";\nconsole.log(greeting);',
    "go": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("Hello, world!")\n}\n',
    "rust": 'fn main() {\n    println!("Hello, world!");\n}\n',
}
_READ_TWO_JS = 'require("fs").readFileSync(0, "utf8").trim().split(/\\s+/).map(Number)'

PRODUCT = {
    "python": "a, b = map(int, input().split())\nprint(a * b)",
    "cpp": "#include <iostream>\nint main() { long a, b; std::cin >> a >> b; "
    'std::cout << a * b << "\\n"; }\n',
    "bash": "read a b\necho $((a * b))",
    "c": '#include <stdio.h>\nint main(void) { long a, b; scanf("%ld %ld", &a, &b); '
    'printf("%ld\\n", a * b); return 0; }\n',
    "java": "import java.util.Scanner;\npublic class Main {\n"
    "    public static void main(String[] args) {\n        Scanner in = new Scanner(System.in);\n"
    "        System.out.println(in.nextLong() * in.nextLong());\n    }\n}\n",
    "nodejs": f"const [a, b] = {_READ_TWO_JS};\nconsole.log(a * b);",
    "typescript": f"const [a, b]: number[] = {_READ_TWO_JS};\nconsole.log(a * b);",
    "go": 'package main\n\nimport "fmt"\n\nfunc main() {\n\tvar a, b int64\n'
    "\tfmt.Scan(&a, &b)\n\tfmt.Println(a * b)\n}\n",
    "rust": "use std::io::Read;\nfn main() {\n    let mut s = String::new();\n"
    "    std::io::stdin().read_to_string(&mut s).unwrap();\n"
    "    let v: Vec<i64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();\n"
    '    println!("{}", v[0] * v[1]);\n}\n',
}
EXIT_3 = {
    "python": "import sys\nprint('before')\nsys.exit(3)",
    "cpp": '#include <cstdio>\nint main() { std::puts("before"); return 3; }\n',
    "bash": "echo before\nexit 3",
    "c": '#include <stdio.h>\nint main(void) { puts("before"); return 3; }\n',
    "java": "public class Main {\n    public static void main(String[] args) {\n"
    '        System.out.println("before");\n        System.exit(3);\n    }\n}\n',
    "nodejs": 'console.log("before");\nprocess.exit(3);',
    "typescript": 'const said: string = "before";\nconsole.log(said);\nprocess.exit(3);',
    "go": 'package main\n\nimport (\n\t"fmt"\n\t"os"\n)\n\nfunc main() {\n'
    '\tfmt.Println("before")\n\tos.Exit(3)\n}\n',
    "rust": 'fn main() {\n    println!("before");\n    std::process::exit(3);\n}\n',
}
SPIN = {
    "python": "while True:\n    pass",
    "cpp": "int main() { volatile unsigned long n = 0; for (;;) n = n + 1; }\n",
    "bash": "while true; do :; done",
    "c": "int main(void) { volatile unsigned long n = 0; for (;;) n = n + 1; }\n",
    "java": "public class Main {\n    public static void main(String[] args) {\n"
    "        long n = 0;\n        while (n >= 0) { n = (n + 1) % 1000; }\n    }\n}\n",
    "nodejs": "for (;;) {}",
    "typescript": "let n: number = 0;\nfor (;;) { n = (n + 1) % 1000; }",
    "go": "package main\n\nfunc main() {\n\tfor {\n\t}\n}\n",
    "rust": "fn main() {\n    loop {}\n}\n",
}
LANGUAGES = sorted(HELLO)


@pytest.mark.parametrize("language", LANGUAGES)
def test_success_matches_sandboxfusion(servers: Servers, language: str) -> None:
    got = post(servers, verl_request(HELLO[language], language))
    want = response("Success", run=finished(0, "Hello, world!\n"), compiled=compile_step(language))
    assert got == want


@pytest.mark.parametrize("language", LANGUAGES)
def test_stdin_is_the_programs_input(servers: Servers, language: str) -> None:
    got = post(servers, verl_request(PRODUCT[language], language, stdin="6 7\n"))
    assert got == response("Success", run=finished(0, "42\n"), compiled=compile_step(language))


@pytest.mark.parametrize("language", LANGUAGES)
def test_non_zero_exit_is_failed_with_its_return_code(servers: Servers, language: str) -> None:
    got = post(servers, verl_request(EXIT_3[language], language))
    want = response("Failed", run=finished(3, "before\n"), compiled=compile_step(language))
    assert got == want


def test_python_exception_is_return_code_1_with_the_traceback(servers: Servers) -> None:
    got = post(servers, verl_request("raise ValueError('boom')", "python"))
    assert got == response("Failed", run=finished(1, stderr=Has("ValueError: boom")))


def test_python_syntax_error_is_a_run_not_a_compile_step(servers: Servers) -> None:
    """SandboxFusion runs ``python file.py``: a syntax error is that run's exit code 1."""
    got = post(servers, verl_request("def f(:\n", "python"))
    assert got == response("Failed", run=finished(1, stderr=Has("SyntaxError")))


@pytest.mark.parametrize("language", LANGUAGES)
def test_timeout_has_no_return_code(servers: Servers, language: str) -> None:
    got = post(servers, verl_request(SPIN[language], language, run_timeout=0.5))
    want = response("Failed", run=time_limit_exceeded(0.5), compiled=compile_step(language))
    assert got == want


def test_cpp_compile_error_is_a_finished_compile_step_with_its_return_code(
    servers: Servers,
) -> None:
    """Not ``Error`` (that is SandboxFusion's own failure, ``SandboxError``): g++ finished
    with return code 1, so the response is ``Failed`` and nothing ran."""
    got = post(servers, verl_request("int main( {", "cpp"))
    assert got == response("Failed", compiled=finished(1, stderr=Has("error")))


BROKEN = {  # a compile error, and a word of the compiler's message
    "c": ("int main(void) { return }\n", "error"),
    "java": ("public class Main { public static void main(String[] a) { int x = ; } }", "error"),
    "go": ('package main\n\nfunc main() {\n\tvar x int = "s"\n\t_ = x\n}\n', "cannot use"),
    "rust": ("fn main() { let x: i32 = ; }", "error"),
}


@pytest.mark.parametrize("language", sorted(BROKEN))
def test_compile_errors_of_every_compiled_language_are_finished_compile_steps(
    servers: Servers, language: str
) -> None:
    code, word = BROKEN[language]
    got = post(servers, verl_request(code, language))
    assert got == response("Failed", compiled=finished(NonZero(), stderr=Has(word)))


def test_a_typescript_syntax_error_is_the_runs_as_under_tsx(servers: Servers) -> None:
    """SandboxFusion runs TypeScript with ``tsx``, no compile step: its syntax error is a run
    that finished with return code 1 and the message on stderr, and no compile_result."""
    got = post(servers, verl_request("let x: = 1;\nconsole.log(x);", "typescript"))
    assert got == response("Failed", run=finished(1, stderr=Has("error TS")))


@pytest.mark.parametrize(("alias", "language"), [("js", "nodejs"), ("ts", "typescript")])
def test_sandboxfusions_other_language_names_are_accepted(
    servers: Servers, alias: str, language: str
) -> None:
    got = post(servers, verl_request(HELLO[language], alias))
    assert got == response("Success", run=finished(0, "Hello, world!\n"))


def test_cpp_compile_timeout_is_honoured(servers: Servers) -> None:
    heavy = "#include <iostream>\n#include <regex>\n#include <map>\nint main() { return 0; }\n"
    got = post(servers, verl_request(heavy, "cpp", compile_timeout=0.01))
    assert got == response("Failed", compiled=time_limit_exceeded(0.0))
    # A compile timeout above the server's compile limit is clamped to it, not refused.
    got = post(servers, verl_request(HELLO["cpp"], "cpp", compile_timeout=10**6))
    assert got == response("Success", run=finished(0, "Hello, world!\n"), compiled=COMPILED)


def test_files_in_and_fetch_files_out_as_in_the_docs(servers: Servers) -> None:
    """upload-download-files.mdx: both samples, answered as documented."""
    flag = base64.b64encode(b"secret flag").decode()
    upload = verl_request('print(open("flag.txt").read())', "python", files={"flag.txt": flag})
    assert post(servers, upload) == response("Success", run=finished(0, "secret flag\n"))
    download = verl_request(
        'open("flag.txt", "w").write("this is a secret")', "python", fetch_files=["flag.txt"]
    )
    want = response("Success", run=finished(0), files={"flag.txt": "dGhpcyBpcyBhIHNlY3JldA=="})
    assert post(servers, download) == want


def test_nested_files_null_files_and_missing_fetches_as_sandboxfusion(servers: Servers) -> None:
    """``restore_files`` creates parent folders and skips null contents; ``run_commands``
    leaves out fetched files that do not exist."""
    data = base64.b64encode(b"1 2 3\n").decode()
    script = (
        "[ -e skipped.txt ] && echo present || echo absent\n"
        "read -a xs < data/in.txt\n"
        "mkdir -p out && echo $(( xs[0] + xs[1] + xs[2] )) > out/sum.txt"
    )
    body = verl_request(
        script,
        "bash",
        files={"data/in.txt": data, "skipped.txt": None},
        fetch_files=["out/sum.txt", "never-written.txt"],
    )
    want = response(
        "Success",
        run=finished(0, "absent\n"),
        files={"out/sum.txt": base64.b64encode(b"6\n").decode()},
    )
    assert post(servers, body) == want


def test_fetched_file_over_the_limit_is_flagged_not_silently_cut(servers: Servers) -> None:
    code = "open('big.bin', 'wb').write(bytes(range(256)) * 40)\nopen('small.txt', 'w').write('ok')"
    body = verl_request(code, "python", fetch_files=["big.bin", "small.txt"])
    got = post(servers, body)
    big = base64.b64decode(got["files"]["big.bin"])
    assert big == (bytes(range(256)) * 40)[:FETCH_LIMIT]  # the first bytes, kept
    assert got["files_truncated"] == ["big.bin"]
    assert base64.b64decode(got["files"]["small.txt"]) == b"ok"
    assert got["status"] == "Success"  # the program did nothing wrong


def test_memory_limit_minus_one_is_the_servers_maximum(servers: Servers) -> None:
    """1200 MiB of address space: over verl's default 1024 MB, under the server's 2048."""
    code = (
        "import resource\n"
        "print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)\n"
        "x = bytes(1200 << 20)\n"  # calloc'd: address space, not resident memory
        "print(len(x) >> 20)"
    )
    got = post(servers, verl_request(code, "python", memory_limit_MB=-1))
    assert got == response("Success", run=finished(0, f"{MAX_MEMORY_MB}\n1200\n"))
    small = post(servers, verl_request(code, "python", memory_limit_MB=1024))
    assert small["status"] == "Failed"
    assert small["run_result"]["stdout"].startswith("1024\n")
    huge = post(servers, verl_request(code, "python", memory_limit_MB=10**9))
    assert huge["run_result"]["stdout"] == f"{MAX_MEMORY_MB}\n1200\n"  # clamped, not refused


def test_ping_answers_pong_to_anyone(servers: Servers) -> None:
    for source in (INSIDE, OUTSIDE):
        with client(source) as c:
            resp = c.get(servers.urls["fusion"] + "/v1/ping")
        assert (resp.status_code, resp.json()) == (200, "pong")


def test_language_is_required_and_unsupported_ones_are_named(servers: Servers) -> None:
    with client() as c:
        url = servers.urls["fusion"] + "/run_code"
        body = verl_request("print(1)", "python")
        del body["language"]
        missing = c.post(url, json=body)
        unsupported = c.post(url, json=verl_request("<?php echo 1;", "php"))
    for resp in (missing, unsupported):
        assert resp.status_code == 422
        assert any(e["loc"] == ["body", "language"] for e in resp.json()["detail"]), resp.text


# --- the allow-list --------------------------------------------------------------------------


def test_allow_list_admits_sandboxfusion_routes_only_from_its_networks(servers: Servers) -> None:
    url = servers.urls["fusion"]
    body = verl_request("print(7)", "python")
    stats = servers.stats["fusion"]
    ran = stats.responses[200]
    with client(INSIDE) as c:
        assert c.post(url + "/run_code", json=body).json()["run_result"]["stdout"] == "7\n"
        # Only SandboxFusion's route: ours still need the token from inside the network too.
        assert c.post(url + "/run", json={"code": "print(7)"}).status_code == 401
        assert c.get(url + "/capabilities").status_code == 401
        # A client that sends a token is judged on it.
        wrong = {"Authorization": "Bearer not-the-token-0000000000"}
        assert c.post(url + "/run_code", json=body, headers=wrong).status_code == 401
    with client(OUTSIDE) as c:
        refused = c.post(url + "/run_code", json=body)
        assert refused.status_code == 401
        assert "missing bearer token" in refused.json()["detail"]
        # A forwarded-for header cannot borrow an allowed address.
        spoofed = c.post(url + "/run_code", json=body, headers={"X-Forwarded-For": INSIDE})
        assert spoofed.status_code == 401
    with client(OUTSIDE, headers=auth_headers(TOKEN)) as c:
        assert c.post(url + "/run_code", json=body).json()["status"] == "Success"
        assert c.post(url + "/run", json={"code": "print(7)"}).json()["stdout"] == "7\n"
    assert stats.responses[200] == ran + 3


# --- overload and sandbox errors: what verl retries ------------------------------------------


class Background:
    """A request posted from its own thread (and its own source address)."""

    def __init__(self, source: str, url: str, body: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None

        def send() -> None:
            with client(source) as c:
                self.response = c.post(url, json=body)

        self.thread = threading.Thread(target=send)
        self.thread.start()

    def result(self) -> httpx.Response:
        self.thread.join(60)
        assert self.response is not None
        return self.response


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_overload_answers_504_which_verl_retries(servers: Servers) -> None:
    """verl's ``call_sandbox_api`` retries 504 only (utils.py, lines 131-145); a 429 or 503
    reaches ``raise_for_status`` and ends the attempts (lines 148 and 156-158), and the test
    case scores -1 (lines 343-345). So /run_code answers overload with 504, Retry-After
    kept; our own routes keep 429 and 503."""
    url = servers.urls["tight"]
    stats = servers.stats["tight"]
    slow = verl_request("import time; time.sleep(1.5); print('done')", "python")
    running = Background("127.0.0.66", url + "/run_code", slow)
    _wait_for(lambda: stats.in_flight == 1, "the first request to run")
    fast = verl_request("print('again')", "python")
    with client("127.0.0.66") as c:  # the same client again: over client_concurrency
        busy_client = c.post(url + "/run_code", json=fast)
    with client("127.0.0.67") as c:  # another client: no slot and no queue
        busy_server = c.post(url + "/run_code", json=fast)
    assert (busy_client.status_code, busy_server.status_code) == (504, 504)
    assert "too many concurrent requests" in busy_client.json()["detail"]
    assert "max_queue=0" in busy_server.json()["detail"]
    for resp in (busy_client, busy_server):
        assert int(resp.headers["retry-after"]) >= 1
    with client("127.0.0.70", headers=auth_headers(TOKEN)) as c:
        assert c.post(url + "/run", json={"code": "print(1)"}).status_code == 503
    assert {429, 503} <= set(stats.rejected)  # the guard's own decisions, as counted
    assert running.result().json()["run_result"]["stdout"] == "done\n"
    _wait_for(lambda: stats.in_flight == 0, "the slot to free")
    # What verl does next: the same request again, after the delay; now it is served.
    with client("127.0.0.67") as c:
        retried = c.post(url + "/run_code", json=fast)
    assert retried.status_code == 200
    assert retried.json()["run_result"]["stdout"] == "again\n"


def test_a_sandbox_error_is_a_504_retry_never_a_score(servers: Servers) -> None:
    """A worker killed under a run is the sandbox's failure. verl scores a 200
    ``SandboxError`` as -1 (utils.py, lines 376-378), so it comes as a 504 (retried) whose
    body is still SandboxFusion's ``SandboxError`` answer, for clients that read it."""
    pool = servers.pool
    assert pool is not None
    url = servers.urls["fusion"] + "/run_code"
    body = verl_request("import time; time.sleep(10)", "python")
    victim = Background("127.0.0.71", url, body)
    _wait_for(lambda: pool.busy >= 1, "the run to start")
    # The pool's own worker process, killed as an OOM killer or a crash would.
    busy = [w for w in pool._workers if w.busy]
    assert len(busy) == 1
    os.kill(busy[0].pid, signal.SIGKILL)
    resp = victim.result()
    assert resp.status_code == 504
    assert int(resp.headers["retry-after"]) >= 1
    answer = resp.json()
    assert (answer["status"], answer["run_result"], answer["compile_result"]) == (
        "SandboxError",
        None,
        None,
    )
    assert answer["message"]  # SandboxFusion's one case with a message
    again = post(servers, verl_request("print('fine')", "python"), source="127.0.0.71")
    assert again["run_result"]["stdout"] == "fine\n"
