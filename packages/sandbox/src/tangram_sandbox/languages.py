"""The languages a pool runs, one spec each, under SandboxFusion's names.

Why a table of specs and not a branch per language: every language takes the same path (an
optional compile job whose one output file, ``main``, is cached by hash in the root-only
cache, then a run job), under the same isolation layers, so what differs is data: the source
file's name, two argv templates, a few environment variables, and how much address space the
runtime reserves beyond the memory it uses. The pool turns a spec into job payloads
(:meth:`LanguageSpec.compile_job`, :meth:`LanguageSpec.run_job`); the program process writes
the source, sets the environment and rlimits, and ``execve``'s the argv. Python alone runs
in the zygote's warm interpreter (an empty ``run``).

Toolchains are looked up on the sandbox's ``PATH``, never the pool's: the program runs as an
unprivileged slot uid, so a toolchain under ``/root`` (rustup's ``~/.cargo``) is unreadable to
it. ``tools/setup_env.py`` installs the Debian packages these specs use.

Memory. ``memory_mb`` is the program's memory: the cgroup memory limit where the host allows
one (the pool reports ``memory_limit`` on its OOM kill), and RLIMIT_AS. The JVM, V8 and the Go
runtime reserve far more address space than they touch (the JVM maps its 120 MB module image,
code cache, class space and a malloc arena per thread, about 350 MB; V8 reserves about 650 MB
of code and heap ranges at start, Go about 700 MB of arena index and page summaries), so under
RLIMIT_AS = memory_mb they cannot start. Their specs raise RLIMIT_AS by a fixed
``address_space_mb`` of headroom (measured, with a margin) and bound the heap itself instead,
with the runtime's own flag (``-Xmx``, ``--max-old-space-size``; Go's ``GOMEMLIMIT`` is soft)
set to ``memory_mb``: a program that outgrows it gets the runtime's out-of-memory error, or the
cgroup's OOM kill, both reported as ``memory_limit`` (:func:`out_of_memory`). Without cgroups
(rootless) their native memory beyond the heap is bounded by the headroom only.

Seccomp needed no exception: every toolchain here compiles and runs under the unchanged
deny-list, and every runtime gets EPERM for an ``AF_INET`` socket (``tests/test_languages.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tangram_sandbox import program

if TYPE_CHECKING:
    from tangram_sandbox.config import PoolConfig

__all__ = [
    "EXTENSIONS",
    "LANGUAGES",
    "LanguageSpec",
    "LanguageUnavailable",
    "language_spec",
    "out_of_memory",
    "table",
    "toolchain",
]

#: Where the sandboxed program looks for executables (its ``PATH``).
SANDBOX_PATH = program.PROGRAM_ENV["PATH"]
#: The compile step's single output, which the zygote caches and copies into each run.
OUTPUT = "main"
_BINARY = f"{program.WORKDIR}/{OUTPUT}"

#: The JVM's reservations, cut to what a test program needs (see the module doc): one GC thread
#: family (serial), a 64 MB code cache and class space, no perf-data file in /tmp.
_JVM_FLAGS = (
    "-XX:+UseSerialGC",
    "-XX:ReservedCodeCacheSize=64m",
    "-XX:CompressedClassSpaceSize=64m",
    "-XX:MaxMetaspaceSize=256m",
    "-XX:-UsePerfData",
)
#: javac is a JVM too; C1 alone starts it faster, and the JVM flags above keep it small.
_JAVAC_SCRIPT = (
    '"$1" {jflags} -J-XX:TieredStopAtLevel=1 -encoding UTF-8 -cp "$3" -d classes "$4"'
    ' && "$2" {jflags} --create --file ' + OUTPUT + " -C classes ."
).format(jflags=" ".join("-J" + f for f in _JVM_FLAGS))

#: TypeScript, transpiled per file as SandboxFusion's ``tsx`` runs it: syntax errors fail the
#: compile step, type errors do not (``tsc`` would reject most programs without ``@types``).
#: argv: ``node -e SCRIPT typescript.js main.ts``; writes the JavaScript to ``main``.
_TS_TRANSPILE = """
const ts = require(process.argv[1]);
const fs = require("fs");
const file = process.argv[2];
const out = ts.transpileModule(fs.readFileSync(file, "utf8"), {
  fileName: file,
  reportDiagnostics: true,
  compilerOptions: {
    module: ts.ModuleKind.CommonJS,
    target: ts.ScriptTarget.ES2020,
    esModuleInterop: true,
  },
});
if (out.diagnostics && out.diagnostics.length) {
  process.stderr.write(ts.formatDiagnostics(out.diagnostics, {
    getCanonicalFileName: (f) => f,
    getCurrentDirectory: () => "",
    getNewLine: () => "\\n",
  }));
  process.exit(1);
}
fs.writeFileSync("main", out.outputText);
"""

#: What runtimes print when a program runs out of memory (checked on a failed run's stderr).
_OOM_ANYWHERE = (
    "std::bad_alloc",  # C++
    "java.lang.OutOfMemoryError",  # JVM: heap, metaspace, array size
    "JavaScript heap out of memory",  # V8: --max-old-space-size reached
    # Go: "fatal error: out of memory" (after "runtime: out of memory: cannot allocate"), or
    # "fatal error: out of memory allocating heap arena metadata".
    "fatal error: out of memory",
)
_RUST_OOM = re.compile(r"memory allocation of \d+ bytes failed")
_JAVA_PUBLIC_CLASS = re.compile(r"\bpublic\s+(?:abstract\s+|final\s+)?class\s+(\w+)")
_JAVA_PACKAGE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.MULTILINE)


class LanguageUnavailable(RuntimeError):
    """This host lacks the toolchain a language needs; the message names what to install."""


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
    """How one language is compiled and run.

    ``run`` and ``compile`` are argv templates; each ``{source}``, ``{main_class}``,
    ``{classpath}`` and ``{memory_mb}`` in them is filled per request (``memory_mb`` with the
    run's limit). ``compile``, where there is one, must leave exactly one file, ``main``, in
    the working directory: the zygote caches it, and copies it into the run's working
    directory (mode 755) before the run starts."""

    name: str
    source: str
    run: tuple[str, ...]
    compile: tuple[str, ...] | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: RLIMIT_AS is ``memory_mb`` plus this, for both steps (see the module doc).
    address_space_mb: int = 0
    #: Executables the steps run: their identity is part of the compile cache key.
    tools: tuple[str, ...] = ()
    missing: str | None = None  # why the toolchain is unusable here, with the fix

    @property
    def compiled(self) -> bool:
        """Whether a compile step runs before the program (and its output is cached)."""
        return self.compile is not None

    def source_name(self, code: str) -> str:
        """The file the code is written to. Java's is its public class's, as ``javac``
        requires (``Main.java`` when the code declares none)."""
        if self.name == "java":
            found = _JAVA_PUBLIC_CLASS.search(code)
            return f"{found.group(1) if found else 'Main'}.java"
        return self.source

    def _values(self, code: str, files: Mapping[str, str], memory_mb: int) -> dict[str, str]:
        source = self.source_name(code)
        values = {"source": source, "memory_mb": str(memory_mb)}
        if self.name == "java":
            package = _JAVA_PACKAGE.search(code)
            stem = source.removesuffix(".java")
            values["main_class"] = f"{package.group(1)}.{stem}" if package else stem
            jars = [os.path.join(program.WORKDIR, n) for n in sorted(files) if n.endswith(".jar")]
            values["classpath"] = ":".join([_BINARY, program.WORKDIR, *_java_libraries(), *jars])
        return values

    def _job(
        self, argv: Sequence[str], code: str, files: Mapping[str, str], memory_mb: int
    ) -> dict[str, Any]:
        if self.missing:
            raise LanguageUnavailable(self.missing)
        values = self._values(code, files, memory_mb)
        filled = [_fill(arg, values) for arg in argv]
        env = {name: _fill(value, values) for name, value in self.env.items()}
        job: dict[str, Any] = {"source": values["source"], "env": env}
        if filled:
            job["argv"] = filled
        if self.address_space_mb:
            job["address_space_mb"] = memory_mb + self.address_space_mb
        return job

    def compile_job(self, code: str, files: Mapping[str, str], memory_mb: int) -> dict[str, Any]:
        """The compile step's payload fields (``source``, ``argv``, ``env``, rlimits)."""
        assert self.compile is not None
        return self._job(self.compile, code, files, memory_mb)

    def run_job(self, code: str, files: Mapping[str, str], memory_mb: int) -> dict[str, Any]:
        """The run step's payload fields; no ``argv`` for Python (the warm interpreter)."""
        return self._job(self.run, code, files, memory_mb)

    def cache_key_parts(self, code: str, files: Mapping[str, str]) -> list[Any]:
        """Everything the compile step reads: the tools (their files' identities), the
        argv and environment templates, the source's name and text, and every file beside it
        (a header or a jar in ``files`` changes the output as much as the source does).
        Limits are left out: a compile that hits one fails, and failures are not cached."""
        assert self.compile is not None
        tools = [tool_identity(t) for t in self.tools]
        source = self.source_name(code)
        return [self.name, tools, self.compile, dict(self.env), source, code, dict(files)]


def _fill(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


@functools.cache
def _which(name: str) -> str | None:
    return shutil.which(name, path=SANDBOX_PATH)


@functools.cache
def _java_libraries() -> tuple[str, ...]:
    """Jars SandboxFusion's Java runner puts on the classpath (MultiPL-E's Java imports
    ``org.javatuples``), where Debian installed them."""
    jar = "/usr/share/java/javatuples.jar"
    return (jar,) if os.path.isfile(jar) else ()


@functools.cache
def tool_identity(path: str) -> list[object]:
    """A tool as the cache key sees it: the file it resolves to, and that file's size, change
    time and inode, so that an upgraded compiler never serves outputs of the old one."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return [real]
    return [real, st.st_size, st.st_mtime_ns, st.st_ino]


def _tools(*names: str, package: str) -> tuple[tuple[str, ...], str | None]:
    found = [_which(n) for n in names]
    lacking = [n for n, path in zip(names, found, strict=True) if path is None]
    if lacking:
        why = (
            f"{', '.join(lacking)} not found on the sandbox's PATH ({SANDBOX_PATH}); install "
            f"the Debian package {package} (`make setup` as root does)"
        )
        return tuple(names), why
    return tuple(p for p in found if p is not None), None


def _build(name: str, cpp_compiler: str, cpp_flags: tuple[str, ...], bash: str) -> LanguageSpec:
    if name == "python":
        return LanguageSpec("python", "main.py", run=())
    if name == "bash":
        return LanguageSpec("bash", "main.sh", run=(bash, "{source}"), tools=(bash,))
    if name == "cpp":
        return LanguageSpec(
            "cpp",
            "main.cpp",
            run=(_BINARY,),
            compile=(cpp_compiler, *cpp_flags, "{source}", "-o", OUTPUT),
            tools=(cpp_compiler,),
        )
    if name == "c":
        (gcc,), missing = _tools("gcc", package="gcc")
        return LanguageSpec(
            "c",
            "main.c",
            run=(_BINARY,),
            compile=(gcc, "-std=gnu17", "-O2", "-pipe", "{source}", "-o", OUTPUT, "-lm"),
            tools=(gcc,),
            missing=missing,
        )
    if name == "java":
        (java, javac, jar, sh), missing = _tools(
            "java", "javac", "jar", "sh", package="default-jdk-headless"
        )
        heap = "-Xmx{memory_mb}m"
        return LanguageSpec(
            "java",
            "Main.java",
            run=(java, heap, *_JVM_FLAGS, "-ea", "-cp", "{classpath}", "{main_class}"),
            compile=(sh, "-c", _JAVAC_SCRIPT, "javac", javac, jar, "{classpath}", "{source}"),
            # glibc gives each thread a 64 MB malloc arena; the JVM starts a dozen threads.
            env={"MALLOC_ARENA_MAX": "2"},
            address_space_mb=512,
            tools=(java, javac, jar, *_java_libraries()),
            missing=missing,
        )
    if name == "nodejs":
        (node,), missing = _tools("node", package="nodejs")
        return LanguageSpec(
            "nodejs",
            "main.js",
            run=(node, "--max-old-space-size={memory_mb}", "{source}"),
            address_space_mb=1024,
            tools=(node,),
            missing=missing,
        )
    if name == "typescript":
        (node, tsc), missing = _tools("node", "tsc", package="nodejs and node-typescript")
        typescript_js = os.path.join(os.path.dirname(os.path.realpath(tsc)), "..", "lib")
        typescript_js = os.path.normpath(os.path.join(typescript_js, "typescript.js"))
        if missing is None and not os.path.isfile(typescript_js):
            missing = f"tsc has no {typescript_js}; install the Debian package node-typescript"
        return LanguageSpec(
            "typescript",
            "main.ts",
            run=(node, "--max-old-space-size={memory_mb}", _BINARY),
            compile=(node, "-e", _TS_TRANSPILE, typescript_js, "{source}"),
            address_space_mb=1024,
            tools=(node, typescript_js),
            missing=missing,
        )
    if name == "go":
        (go,), missing = _tools("go", package="golang-go")
        return LanguageSpec(
            "go",
            "main.go",
            run=(_BINARY,),
            compile=(go, "build", "-o", OUTPUT, "{source}"),
            # The build cache in the private /tmp (Debian ships the standard library built,
            # so a cold cache costs only the program's own package); no module downloads.
            # GOMEMLIMIT makes the collector work harder near the limit (a soft bound).
            # GOMAXPROCS bounds the runtime's threads, which otherwise follow the host's CPU
            # count: on a 64-core host `go build` alone passes the processes limit (EAGAIN
            # from fork/exec, measured), and a worker is one CPU slot anyway.
            env={
                "GOCACHE": "/tmp/.cache/go-build",
                "GOPATH": "/tmp/go",
                "GOPROXY": "off",
                "GOMEMLIMIT": "{memory_mb}MiB",
                "GOMAXPROCS": "2",
            },
            # The Go runtime reserves about 700 MB up front (heap arena index, page summaries).
            address_space_mb=768,
            tools=(go,),
            missing=missing,
        )
    if name == "rust":
        (rustc,), missing = _tools("rustc", package="rustc")
        return LanguageSpec(
            "rust",
            "main.rs",
            run=(_BINARY,),
            compile=(rustc, "-O", "--edition", "2021", "-o", OUTPUT, "{source}"),
            tools=(rustc,),
            missing=missing,
        )
    raise ValueError(f"unknown language {name!r}; known: {', '.join(LANGUAGES)}")


#: Every language a pool runs, in SandboxFusion's spelling.
LANGUAGES: tuple[str, ...] = (
    "python",
    "cpp",
    "c",
    "java",
    "nodejs",
    "typescript",
    "go",
    "rust",
    "bash",
)
#: A source file's language by its extension (``tangram-sandbox run FILE``).
EXTENSIONS: dict[str, str] = {
    ".py": "python",
    ".cpp": "cpp",
    ".cc": "cpp",
    ".c": "c",
    ".java": "java",
    ".js": "nodejs",
    ".ts": "typescript",
    ".go": "go",
    ".rs": "rust",
    ".sh": "bash",
}


@functools.cache
def _spec(name: str, cpp_compiler: str, cpp_flags: tuple[str, ...], bash: str) -> LanguageSpec:
    return _build(name, cpp_compiler, cpp_flags, bash)


def language_spec(name: str, config: PoolConfig) -> LanguageSpec:
    """The spec of ``name`` under ``config`` (its C++ compiler and flags, its bash)."""
    return _spec(name, config.cpp_compiler, tuple(config.cpp_flags), config.bash)


def toolchain(name: str, config: PoolConfig) -> str | None:
    """Why ``name`` cannot run on this host (the missing tools and the package to install),
    or None when it can."""
    return language_spec(name, config).missing


def table(config: PoolConfig) -> str:
    """Which languages this host runs, and for the rest what to install (``tangram-sandbox
    capabilities``)."""
    width = max(len(name) for name in LANGUAGES)
    rows = ["languages (toolchains on the sandbox's PATH)"]
    for name in LANGUAGES:
        missing = toolchain(name, config)
        rows.append(f"  {name:<{width}}  {'NO ' if missing else 'yes'}  {missing or ''}".rstrip())
    return "\n".join(rows)


def out_of_memory(stderr: str) -> bool:
    """Whether a failed program's stderr shows that it ran out of memory (C++, the JVM, V8,
    Go, Rust; Python's ``MemoryError`` as its last words)."""
    if any(marker in stderr for marker in _OOM_ANYWHERE):
        return True
    return "MemoryError" in stderr[-200:] or _RUST_OOM.search(stderr[-4096:]) is not None
