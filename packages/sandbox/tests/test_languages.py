"""Every language, end to end in one real pool: answers, failures, limits, batches, the compile
cache, and the isolation layers.

One probe program per language does what stdin asks (``hello NAME``, ``exit``, ``spin``,
``write PATH...``, ``net``, ``sleep``, ``alloc``), so that each language compiles it once and
every later run comes from the cache. A language whose toolchain this host lacks is skipped
with the reason (``make setup`` as root installs them all).
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar, get_args

import pytest

from tangram_sandbox.languages import LANGUAGES, language_spec, toolchain
from tangram_sandbox.models import Language, RunResult, RunStatus
from tangram_sandbox.pool import SandboxPool

pytestmark = pytest.mark.usefixtures("can_sandbox")
T = TypeVar("T")

# A private slot-uid range, so that the host's process table shows this module's programs only.
_UID_BASE = 264_000
_UID_COUNT = 8
SMALL: dict[str, Any] = {"wall_s": 5, "memory_mb": 256}
TIMEOUT_S = 1.0

C_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    char cmd[64] = "", arg[4096];
    if (scanf("%63s", cmd) != 1) return 2;
    if (!strcmp(cmd, "hello") && scanf("%4095s", arg) == 1) { printf("hello %s\n", arg); return 0; }
    if (!strcmp(cmd, "exit")) { fputs("bye\n", stderr); return 3; }
    if (!strcmp(cmd, "spin")) { volatile unsigned long n = 0; for (;;) n = n + 1; }
    if (!strcmp(cmd, "write")) {
        while (scanf("%4095s", arg) == 1) {
            FILE *f = fopen(arg, "w");
            int ok = f != NULL && fputs("x", f) >= 0;
            if (f != NULL && fclose(f) != 0) ok = 0;
            printf("%s:%s\n", arg, ok ? "ok" : "denied");
        }
        return 0;
    }
    if (!strcmp(cmd, "net")) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) printf("net:denied %s\n", strerror(errno)); else puts("net:opened");
        return 0;
    }
    if (!strcmp(cmd, "sleep")) { sleep(1); puts("woke"); return 0; }
    return 2;
}
"""

CPP_PROBE = C_PROBE.replace(
    'if (!strcmp(cmd, "net"))',
    'if (!strcmp(cmd, "alloc")) { std::vector<std::vector<char>> v; for (;;) v.emplace_back'
    "(1 << 20, 1); }\n    " + 'if (!strcmp(cmd, "net"))',
).replace("#include <errno.h>", "#include <vector>\n#include <errno.h>")

JAVA_PROBE = """
import java.io.*;
import java.net.*;
import java.util.*;

public class Solution {
    public static void main(String[] args) throws Exception {
        Scanner in = new Scanner(System.in);
        switch (in.next()) {
            case "hello":
                System.out.println("hello " + in.next());
                return;
            case "exit":
                System.err.println("bye");
                System.exit(3);
            case "spin":
                while (true) { }
            case "write":
                while (in.hasNext()) {
                    String p = in.next();
                    try (FileWriter w = new FileWriter(p)) {
                        w.write("x");
                        System.out.println(p + ":ok");
                    } catch (IOException e) {
                        System.out.println(p + ":denied");
                    }
                }
                return;
            case "net":
                try (ServerSocket s = new ServerSocket(0)) {
                    System.out.println("net:opened");
                } catch (IOException e) {
                    System.out.println("net:denied " + e.getMessage());
                }
                return;
            case "sleep":
                Thread.sleep(1000);
                System.out.println("woke");
                return;
            case "alloc":
                List<long[]> keep = new ArrayList<>();
                while (true) keep.add(new long[1 << 17]);
        }
        System.exit(2);
    }
}
"""

NODE_PROBE = """
const fs = require("fs");
const [cmd, ...args] = fs.readFileSync(0, "utf8").split(/\\s+/).filter(Boolean);
if (cmd === "hello") console.log("hello " + args[0]);
else if (cmd === "exit") { console.error("bye"); process.exit(3); }
else if (cmd === "spin") { for (;;) {} }
else if (cmd === "write") {
  for (const p of args) {
    try { fs.writeFileSync(p, "x"); console.log(p + ":ok"); }
    catch (e) { console.log(p + ":denied"); }
  }
}
else if (cmd === "net") {
  const server = require("net").createServer();
  server.on("error", (e) => console.log("net:denied " + e.code));
  server.listen(0, "127.0.0.1", () => { console.log("net:opened"); server.close(); });
}
else if (cmd === "sleep") setTimeout(() => console.log("woke"), 1000);
else if (cmd === "alloc") { const keep = []; for (;;) keep.push(new Array(1 << 16).fill(1.5)); }
else process.exit(2);
"""

TS_PROBE = """
import * as fs from "fs";
import * as net from "net";

interface Command { name: string; args: string[] }

const words: string[] = fs.readFileSync(0, "utf8").split(/\\s+/).filter(Boolean);
const command: Command = { name: words[0], args: words.slice(1) };
switch (command.name) {
  case "hello": console.log(`hello ${command.args[0]}`); break;
  case "exit": console.error("bye"); process.exit(3);
  case "spin": for (;;) {}
  case "write":
    for (const p of command.args) {
      try { fs.writeFileSync(p, "x"); console.log(`${p}:ok`); }
      catch (e) { console.log(`${p}:denied`); }
    }
    break;
  case "net": {
    const server: net.Server = net.createServer();
    server.on("error", (e: NodeJS.ErrnoException) => console.log(`net:denied ${e.code}`));
    server.listen(0, "127.0.0.1", () => { console.log("net:opened"); server.close(); });
    break;
  }
  case "sleep": setTimeout(() => console.log("woke"), 1000); break;
  case "alloc": { const keep: number[][] = []; for (;;) keep.push(new Array(1 << 16).fill(1.5)); }
  default: process.exit(2);
}
"""

GO_PROBE = """
package main

import (
	"bufio"
	"fmt"
	"os"
	"syscall"
	"time"
)

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Split(bufio.ScanWords)
	var words []string
	for in.Scan() {
		words = append(words, in.Text())
	}
	if len(words) == 0 {
		os.Exit(2)
	}
	switch words[0] {
	case "hello":
		fmt.Println("hello", words[1])
	case "exit":
		fmt.Fprintln(os.Stderr, "bye")
		os.Exit(3)
	case "spin":
		for {
		}
	case "write":
		for _, p := range words[1:] {
			if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
				fmt.Println(p + ":denied")
			} else {
				fmt.Println(p + ":ok")
			}
		}
	case "net":
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
		if err != nil {
			fmt.Println("net:denied", err)
		} else {
			syscall.Close(fd)
			fmt.Println("net:opened")
		}
	case "sleep":
		time.Sleep(time.Second)
		fmt.Println("woke")
	case "alloc":
		var keep [][]byte
		for {
			b := make([]byte, 1<<20)
			for i := range b {
				b[i] = 1
			}
			keep = append(keep, b)
		}
	default:
		os.Exit(2)
	}
}
"""

RUST_PROBE = """
use std::io::Read;

fn main() {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).unwrap();
    let words: Vec<&str> = input.split_whitespace().collect();
    match words.first().copied() {
        Some("hello") => println!("hello {}", words[1]),
        Some("exit") => {
            eprintln!("bye");
            std::process::exit(3);
        }
        Some("spin") => loop {},
        Some("write") => {
            for p in &words[1..] {
                match std::fs::write(p, "x") {
                    Ok(_) => println!("{}:ok", p),
                    Err(_) => println!("{}:denied", p),
                }
            }
        }
        Some("net") => match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(_) => println!("net:opened"),
            Err(e) => println!("net:denied {}", e),
        },
        Some("sleep") => {
            std::thread::sleep(std::time::Duration::from_secs(1));
            println!("woke");
        }
        Some("alloc") => {
            let mut keep: Vec<Vec<u8>> = Vec::new();
            loop {
                keep.push(vec![1u8; 1 << 20]);
            }
        }
        _ => std::process::exit(2),
    }
}
"""

BASH_PROBE = """
read -r cmd arg rest
case "$cmd" in
  hello) echo "hello $arg" ;;
  exit) echo bye >&2; exit 3 ;;
  spin) while :; do :; done ;;
  write)
    for p in $arg $rest; do
      if (printf x > "$p") 2>/dev/null; then echo "$p:ok"; else echo "$p:denied"; fi
    done ;;
  net)
    if (: > /dev/tcp/127.0.0.1/9) 2>/tmp/net.err; then echo net:opened
    else echo "net:denied $(cat /tmp/net.err)"; fi ;;
  sleep) sleep 1; echo woke ;;
  *) exit 2 ;;
esac
"""

PYTHON_PROBE = """
import socket, sys, time
words = sys.stdin.read().split()
cmd, args = words[0], words[1:]
if cmd == "hello":
    print("hello", args[0])
elif cmd == "exit":
    print("bye", file=sys.stderr)
    sys.exit(3)
elif cmd == "spin":
    while True:
        pass
elif cmd == "write":
    for p in args:
        try:
            with open(p, "w") as f:
                f.write("x")
            print(p + ":ok")
        except OSError:
            print(p + ":denied")
elif cmd == "net":
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        print("net:opened")
    except OSError as exc:
        print("net:denied", exc)
elif cmd == "sleep":
    time.sleep(1)
    print("woke")
elif cmd == "alloc":
    keep = bytearray(1 << 34)
else:
    sys.exit(2)
"""

PROBES: dict[str, str] = {
    "python": PYTHON_PROBE,
    "cpp": CPP_PROBE,
    "c": C_PROBE,
    "java": JAVA_PROBE,
    "nodejs": NODE_PROBE,
    "typescript": TS_PROBE,
    "go": GO_PROBE,
    "rust": RUST_PROBE,
    "bash": BASH_PROBE,
}
#: A syntax error, and a fragment of what the compiler says about it.
BROKEN: dict[str, tuple[str, str]] = {
    "cpp": ("int main( {", "error"),
    "c": ("int main(void) { return 0 }", "error"),
    "java": ("public class Main { public static void main(String[] a) { int x = } }", "error:"),
    "typescript": ("let x: number = ;\n", "error TS"),
    "go": ("package main\nfunc main() { x := }\n", "syntax error"),
    "rust": ("fn main() { let x = ; }\n", "error"),
}
#: The languages whose runtime names running out of memory (C's malloc returns NULL instead).
OOM_LANGUAGES = ("python", "cpp", "java", "nodejs", "typescript", "go", "rust")
COMPILED = tuple(lang for lang in LANGUAGES if lang in BROKEN)


class Pool:
    """One real pool for the whole module, driven from synchronous tests on its own loop."""

    def __init__(self, cache_dir: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = SandboxPool(
            min_workers=2,
            max_workers=2,
            uid_base=_UID_BASE,
            uid_count=_UID_COUNT,
            cache_dir=cache_dir,
        )
        self.loop.run_until_complete(self.pool.start())

    def wait(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def run(self, language: str, stdin: str = "", code: str | None = None, **kw: Any) -> RunResult:
        code = PROBES[language] if code is None else code
        kw.setdefault("limits", SMALL)
        return self.wait(self.pool.run(code=code, language=language, stdin=stdin, **kw))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    pool = Pool(str(tmp_path_factory.mktemp("compile-cache")))
    yield pool
    pool.close()


def _need(sandbox: Pool, language: str) -> None:
    why = toolchain(language, sandbox.pool.config)
    if why is not None:
        pytest.skip(f"{language}: {why}")


def test_the_model_and_the_table_name_the_same_languages() -> None:
    assert set(get_args(Language)) == set(LANGUAGES)
    assert set(PROBES) == set(LANGUAGES)


@pytest.mark.parametrize("language", LANGUAGES)
def test_hello_with_stdin_and_a_runtime_error(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    hello = sandbox.run(language, "hello tangram")
    assert (hello.status, hello.stdout, hello.exit_code) == (RunStatus.OK, "hello tangram\n", 0)
    assert hello.compiled is (True if language in COMPILED else None)
    failed = sandbox.run(language, "exit")
    assert (failed.status, failed.exit_code) == (RunStatus.RUNTIME_ERROR, 3), failed
    assert "bye" in failed.stderr


@pytest.mark.parametrize("language", COMPILED)
def test_a_compile_error_reports_the_compilers_message(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    code, says = BROKEN[language]
    got = sandbox.run(language, "", code=code)
    assert (got.status, got.compiled, got.error) == (
        RunStatus.COMPILE_ERROR,
        False,
        "compilation failed",
    ), got
    assert says in got.stderr, got.stderr
    assert got.stdout == ""


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_program_that_spins_times_out(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    sandbox.run(language, "hello warm")  # compiled outside the timed run
    got = sandbox.run(language, "spin", limits=dict(SMALL, wall_s=TIMEOUT_S))
    assert got.status is RunStatus.TIMEOUT, got
    assert TIMEOUT_S * 0.9 < got.wall_s < TIMEOUT_S + 2.0


@pytest.mark.parametrize("language", OOM_LANGUAGES)
def test_outgrowing_the_memory_limit_is_memory_limit(sandbox: Pool, language: str) -> None:
    """The JVM and V8 run with address-space headroom but their heap bounded at memory_mb
    (``-Xmx``, ``--max-old-space-size``); the others under RLIMIT_AS (and the cgroup)."""
    _need(sandbox, language)
    got = sandbox.run(language, "alloc", limits={"wall_s": 10, "memory_mb": 256})
    assert got.status is RunStatus.MEMORY_LIMIT, got
    assert got.error == "memory limit of 256 MiB exceeded"


@pytest.mark.parametrize("language", LANGUAGES)
def test_run_tests_judges_stdin_tests_in_a_batch(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    tests = [
        {"stdin": "hello a", "expected_stdout": "hello a"},
        {"stdin": "hello b\n", "expected_stdout": "hello b\n"},
        {"stdin": "hello c", "expected_stdout": "wrong"},
        {"stdin": "exit", "expected_stdout": ""},
        {"stdin": "hello d", "expected_stdout": "hello d"},
    ]
    got = sandbox.wait(
        sandbox.pool.run_tests(code=PROBES[language], language=language, tests=tests, limits=SMALL)
    )
    assert got.status is RunStatus.OK, got
    assert [v.passed for v in got.verdicts] == [True, True, False, False, True]
    assert [v.status for v in got.verdicts] == [
        RunStatus.OK,
        RunStatus.OK,
        RunStatus.OK,
        RunStatus.RUNTIME_ERROR,
        RunStatus.OK,
    ]
    assert got.verdicts[2].message == "wrong answer"
    assert got.pass_fraction == pytest.approx(3 / 5)


@pytest.mark.parametrize("language", COMPILED)
def test_the_second_compile_of_a_source_is_a_cache_hit(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    cache = sandbox.pool.config.cache_dir
    code = PROBES[language] + f"\n// {uuid.uuid4().hex}\n"  # a source no other test compiles
    before = set(os.listdir(cache))
    first = sandbox.run(language, "hello one", code=code)
    added = set(os.listdir(cache)) - before
    second = sandbox.run(language, "hello two", code=code)
    assert (first.status, first.stdout, first.compiled) == (RunStatus.OK, "hello one\n", True)
    assert (first.compile_s or 0.0) > 0.0, "the first run did not compile"
    assert len(added) == 1, "one cached output per source"
    assert (second.status, second.stdout, second.compiled) == (RunStatus.OK, "hello two\n", True)
    assert second.compile_s == 0.0, "the second run compiled again"
    assert set(os.listdir(cache)) - before == added


def _running(exe: str, uids: set[int]) -> set[int]:
    """Which of ``uids`` (as the host sees them) own a live process running ``exe``."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
            if uid in uids and os.readlink(f"/proc/{pid}/exe") == exe:
                found.add(uid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("language", [lang for lang in LANGUAGES if lang != "python"])
def test_the_program_runs_as_the_slot_uid(sandbox: Pool, language: str) -> None:
    """Seen from the host's process table while it runs (inside its user namespace it is
    65534): the program's executable runs under one of this pool's slot uids (leased host-wide,
    so no other pool's process can hold one). Python is left out: its program and the waiting
    spare are both the interpreter (test_security covers it)."""
    _need(sandbox, language)
    if os.geteuid() != 0:
        pytest.skip("slot uids need root")
    pool = sandbox.pool
    sandbox.run(language, "hello warm")
    argv = language_spec(language, pool.config).run_job(PROBES[language], {}, 256)["argv"]
    exe = os.path.realpath(argv[0]) if not argv[0].startswith("/tmp/") else argv[0]

    slots = {w.slot.uid for w in pool._workers}

    async def watch() -> tuple[RunResult, set[int]]:
        # The warm-up's process finishes dying just after its answer (the zygote answers at
        # its exit_group, see zygote._Zygote._watch): let it go before watching.
        for _ in range(200):
            if not _running(exe, slots):
                break
            await asyncio.sleep(0.01)
        task = asyncio.ensure_future(
            pool.run(code=PROBES[language], language=language, stdin="sleep", limits=SMALL)
        )
        seen: set[int] = set()
        while not task.done():
            seen |= _running(exe, slots)
            await asyncio.sleep(0.02)
        return await task, seen

    result, seen = sandbox.wait(watch())
    assert (result.status, result.stdout) == (RunStatus.OK, "woke\n"), result
    assert len(seen) == 1, f"not one slot uid of {slots} ran {exe}: {seen}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_program_cannot_write_outside_its_working_dir(sandbox: Pool, language: str) -> None:
    _need(sandbox, language)
    tag = f"tangram-lang-{uuid.uuid4().hex[:12]}"
    outside = [
        f"/{tag}",
        f"/etc/{tag}",
        f"/usr/{tag}",
        f"/var/tmp/{tag}",
        os.path.join(sandbox.pool.config.cache_dir, tag),
        os.path.join(os.path.dirname(os.path.abspath(__file__)), tag),
    ]
    got = sandbox.run(
        language, " ".join(["write", *outside, "inside.txt"]), fetch_files=["inside.txt"]
    )
    assert got.status is RunStatus.OK, got
    lines = got.stdout.splitlines()
    assert lines == [f"{p}:denied" for p in outside] + ["inside.txt:ok"]
    assert base64.b64decode(got.files["inside.txt"]) == b"x"
    for path in outside:
        assert not os.path.exists(path), f"{path} appeared on the host"


@pytest.mark.parametrize("language", LANGUAGES)
def test_the_program_cannot_open_an_inet_socket(sandbox: Pool, language: str) -> None:
    """Seccomp answers socket(AF_INET) with EPERM, in every runtime."""
    _need(sandbox, language)
    got = sandbox.run(language, "net")
    assert got.status is RunStatus.OK, got
    line = got.stdout.strip() + " " + got.stderr
    assert line.startswith("net:denied"), got
    assert "EPERM" in line or "not permitted" in line.lower(), line


def test_java_names_the_file_after_its_public_class_and_finds_javatuples(sandbox: Pool) -> None:
    """javac needs a public class in a file of its name (the probe's is ``Solution``); a
    package declaration moves the class; javatuples is on the classpath, as SandboxFusion
    has it for MultiPL-E's Java."""
    _need(sandbox, "java")
    code = (
        "package demo;\n"
        "import org.javatuples.Pair;\n"
        "public final class App {\n"
        "    public static void main(String[] args) {\n"
        '        System.out.println(Pair.with(1, "a"));\n'
        '        assert args.length > 5 : "assertions are on";\n'
        "    }\n"
        "}\n"
    )
    if not os.path.isfile("/usr/share/java/javatuples.jar"):
        code = code.replace("import org.javatuples.Pair;\n", "").replace(
            'Pair.with(1, "a")', '"[1, a]"'
        )
    got = sandbox.run("java", "", code=code)
    assert got.stdout == "[1, a]\n", got
    assert got.status is RunStatus.RUNTIME_ERROR, "java runs with -ea, as SandboxFusion's does"
    assert "assertions are on" in got.stderr


def test_typescript_is_transpiled_without_type_checking(sandbox: Pool) -> None:
    """As SandboxFusion's ``tsx`` runs it: a type error is not a compile error."""
    _need(sandbox, "typescript")
    got = sandbox.run("typescript", "", code='const n: number = "seven";\nconsole.log(n);\n')
    assert (got.status, got.stdout, got.compiled) == (RunStatus.OK, "seven\n", True)


def test_a_missing_toolchain_is_refused_by_name_and_costs_no_worker(
    sandbox: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host without a language's toolchain refuses its requests with the package to install
    (never a compile or runtime error that a trainer would score), and the pool runs on."""
    from tangram_sandbox import languages

    monkeypatch.setattr(languages, "_which", lambda name: None if name == "rustc" else "/bin/sh")
    languages._spec.cache_clear()
    try:
        with pytest.raises(languages.LanguageUnavailable, match="Debian package rustc"):
            sandbox.run("rust", "hello x")
    finally:
        languages._spec.cache_clear()
    ok = sandbox.run("python", "hello again")
    assert (ok.status, ok.stdout) == (RunStatus.OK, "hello again\n")
    assert sandbox.pool.busy == 0
