"""Mutation testing of operators/, state/ and flows/ (``make mutate``; tests/MUTATION.md).

cosmic-ray finds the mutants: its operators (comparison, arithmetic, boolean and
unary operators swapped, numbers moved by one, ``not`` added, loops and
exception handlers emptied, ...) applied one at a time to the module's syntax
tree, with a session database per module that ``cr-report`` and ``cr-html``
read. This runner runs them: each mutant is written into a private copy of the
tree (``.mutants/tree0``, where ``crmstream.<package>`` resolves to the copy, not
to the work tree the editable install points at), then the module's tests
(``TESTS``: fast ones, a few seconds) run in a fresh interpreter with ``-x``.
A mutant is killed when they fail or time out. The Numba kernels run compiled:
a mutant of one file recompiles only that file's kernels (the copy keeps the
others' cache), because interpreted (``NUMBA_DISABLE_JIT=1``) they do not
compute what they compile to (NumPy 2 keeps ``uint8 + int`` a ``uint8``; Numba
widens it), so the tests would fail on every mutant.

``--sample N --seed S`` runs a fixed sample of N mutants per module (the same
ones while the module's code does not change); ``--changed REF`` only the
modules changed since a git ref. Surviving mutants judged equivalent are listed
in tests/mutation/equivalent.txt with the reason; the score leaves them out.

    python -m tests.mutation.run [--module operators/fields.py ...] [--sample 40]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutants"
PACKAGES = ("config", "flows", "operators", "state", "bench")
FAST = "not integration and not slow"
# The tests that hold each module: fast (no servers unless the module does I/O).
TESTS: dict[str, tuple[str, ...]] = {
    "operators/fields.py": ("tests/test_contract.py", "tests/test_events.py",
                            "tests/test_thresholds.py"),
    "operators/events.py": ("tests/test_contract.py", "tests/test_events.py",
                            "tests/test_thresholds.py"),
    "operators/redaction.py": ("tests/test_redaction.py", "tests/test_events.py"),
    "operators/kernels.py": ("tests/test_thresholds.py", "tests/test_guards.py",
                             "tests/test_kernels.py"),
    "operators/params.py": ("tests/test_thresholds.py", "tests/test_kernels.py",
                            "tests/test_guards.py", "tests/test_customer_step.py"),
    "operators/windows.py": ("tests/test_kernels.py", "tests/test_thresholds.py"),
    "operators/derive.py": ("tests/test_kernels.py", "tests/test_thresholds.py"),
    "operators/reference.py": ("tests/test_kernels.py",),
    "operators/btyd.py": ("tests/test_kernels.py", "tests/test_fitting.py"),
    "operators/fitting.py": ("tests/test_fitting.py",),
    "operators/hashing.py": ("tests/test_hashing.py", "tests/test_guards.py"),
    "operators/policies.py": ("tests/test_thresholds.py", "tests/test_policy_engine.py",
                              "tests/test_quiet_hours.py", "tests/test_customer_step.py"),
    "operators/catalog.py": ("tests/test_thresholds.py", "tests/test_customer_step.py",
                             "tests/test_birthday.py"),
    "operators/customer_step.py": ("tests/test_customer_step.py", "tests/test_thresholds.py"),
    "operators/step_io.py": ("tests/test_customer_step.py", "tests/test_batching.py"),
    "operators/firings.py": ("tests/test_customer_step.py", "tests/test_thresholds.py"),
    "operators/timer_slots.py": ("tests/test_wake.py", "tests/test_customer_step.py",
                                 "tests/test_thresholds.py"),
    "operators/rules.py": ("tests/test_rules.py",),
    "operators/zones.py": ("tests/test_quiet_hours.py", "tests/test_events.py"),
    "operators/columns.py": ("tests/test_customer_step.py", "tests/test_guards.py"),
    "flows/shard_step.py": ("tests/test_guards.py", "tests/test_shard_step.py",
                            "tests/test_batching.py"),
    "flows/step_work.py": ("tests/test_guards.py", "tests/test_shard_step.py",
                           "tests/test_batching.py"),
}  # fmt: skip


# Modules whose tests need the servers (tests/conftest.py starts them per test run).
MARKERS = {"flows/shard_step.py": "not slow", "flows/step_work.py": "not slow"}


class Mutant(NamedTuple):
    job_id: str
    module: str
    operator: str
    occurrence: int
    line: int
    definition: str | None


# -- the copy of the tree -----------------------------------------------------------------
def make_tree(dest: Path) -> None:
    """A copy of the tracked files (and this work tree's changes to them), with
    ``crmstream/<package>`` links so that imports resolve inside the copy. Kept between
    runs: it holds the compiled kernels' cache."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    for name in files:
        src, dst = ROOT / name, dest / name
        if not src.is_file():
            continue
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for package in PACKAGES:
        link = dest / "crmstream" / package
        if not link.is_symlink():
            link.symlink_to(Path("..") / package)


class _Module(NamedTuple):
    imports: dict[str, tuple[str, str]]  # local name -> (module of ours, its name there)
    in_kernels: set[str]  # the names the module's compiled kernels use


def _modules() -> dict[str, _Module]:
    """Per module of ours (``operators/kernels.py``): what it imports from ours, and the
    names its Numba kernels use."""
    out = {}
    for package in ("operators", "state", "flows", "config"):
        for path in (ROOT / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            imports = {}
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and (node.module or "").count(".") == 2:
                    top, pkg, mod = node.module.split(".")
                    if top == "crmstream":
                        for alias in node.names:
                            imports[alias.asname or alias.name] = (f"{pkg}/{mod}.py", alias.name)
            used: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef) and any(
                    "njit" in ast.dump(d) for d in node.decorator_list
                ):
                    used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            out[f"{package}/{path.name}"] = _Module(imports, used)
    return out


def stale_kernels(module: str) -> list[str]:
    """The modules whose compiled kernels may hold ``module``'s code or constants. Numba's
    cache knows a kernel by its own file only: a kernel of kernels.py that calls a kernel
    of windows.py (or reads a constant of params.py) keeps its compiled code when only
    that module changes, so a mutant of it would not run at all. A kernel holds the
    modules of the names it uses (followed through re-exports), the modules those import
    from (a constant computed from another's), and what their kernels hold."""
    modules = _modules()

    def origins(mod: str, name: str) -> set[str]:
        found = {mod}
        source = modules.get(mod)
        if source and name in source.imports:
            other, original = source.imports[name]
            found |= origins(other, original)
        return found

    def held(mod: str, seen: frozenset = frozenset()) -> set[str]:
        info = modules[mod]
        if not info.in_kernels or mod in seen:
            return set()
        out = {mod}
        for name in info.in_kernels:
            for origin in origins(mod, name) - {mod}:
                out.add(origin)
                if origin in modules:
                    out |= held(origin, seen | {mod})
                    # a constant computed there from what it imports (params' event codes)
                    out |= {src for src, _ in modules[origin].imports.values()}
        return out

    return sorted(mod for mod in modules if module in held(mod))


def clear_kernels(tree: Path, modules: list[str]) -> None:
    """Remove the compiled-kernel cache of ``modules`` in ``tree`` (compiled again on use)."""
    for name in modules:
        path = tree / name
        for cached in path.parent.glob(f"__pycache__/{path.stem}.*.nb[ic]"):
            cached.unlink(missing_ok=True)


def run_tests(
    tree: Path,
    tests: tuple[str, ...],
    timeout: float,
    env: dict,
    marker: str = FAST,
    mutant: bool = False,
) -> tuple[str, str]:
    """Run ``tests`` in ``tree``: ("killed" | "survived" | "timeout", the output's tail)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-m", marker, "--timeout", str(int(timeout)), *tests]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout + 30)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", ""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    if "Timeout" in tail:
        return "timeout", tail
    # No test collected, or (unmutated) a usage error: not a verdict on the mutant. A
    # mutant the conftest cannot import also ends in a usage error: it is killed.
    if done.returncode == 5 or (done.returncode == 4 and not mutant):
        raise RuntimeError(f"pytest {' '.join(tests)} ran no test: {tail}")
    return ("survived" if done.returncode == 0 else "killed"), tail


def test_env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    env["PYTHONPATH"] = str(tree)
    env["HYPOTHESIS_PROFILE"] = env.get("HYPOTHESIS_PROFILE", "default")
    return env


# -- mutants ------------------------------------------------------------------------------
def mutants_of(module: str, db_path: Path) -> list[Mutant]:
    """The module's mutants (a cosmic-ray session at ``db_path``, made afresh when the
    module's text changed)."""
    from cosmic_ray.commands import init
    from cosmic_ray.work_db import WorkDB, use_db

    source = (ROOT / module).read_text()
    stamp = db_path.with_suffix(".source")
    if not (db_path.exists() and stamp.exists() and stamp.read_text() == source):
        db_path.unlink(missing_ok=True)
        with use_db(str(db_path), WorkDB.Mode.create) as db:
            init([Path(module)], db, {})
        stamp.write_text(source)
    out = []
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        for item in db.work_items:
            m = item.mutations[0]
            out.append(Mutant(item.job_id, module, m.operator_name, m.occurrence,
                              m.start_pos[0], m.definition_name))  # fmt: skip
    out.sort(key=lambda m: (m.line, m.operator, m.occurrence))
    return out


def mutate(source: str, mutant: Mutant) -> str | None:
    import cosmic_ray.plugins
    from cosmic_ray.mutating import mutate_code

    return mutate_code(source, cosmic_ray.plugins.get_operator(mutant.operator)(),
                       mutant.occurrence)  # fmt: skip


def _without_annotations(code: str) -> str | None:
    """The module's syntax tree with the annotations of function signatures and of
    variables inside functions removed (``from __future__ import annotations``: never
    evaluated), as text; None if it does not parse."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.returns = None
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg,
                        args.kwarg]:  # fmt: skip
                if arg is not None:
                    arg.annotation = None
            for inner in ast.walk(node):
                if isinstance(inner, ast.AnnAssign):
                    inner.annotation = ast.Constant(None)
    return ast.dump(tree)


def annotation_only(original: str, mutated: str) -> bool:
    """Whether the mutant changes nothing but annotations that are never evaluated."""
    if "from __future__ import annotations" not in original:
        return False
    return _without_annotations(original) == _without_annotations(mutated)


def equivalents() -> dict[tuple[str, str, str], str]:
    """(module, operator, the mutated line's text stripped) -> why the mutant is
    equivalent (tests/mutation/equivalent.txt: ``module | operator | line | reason``)."""
    out = {}
    path = Path(__file__).with_name("equivalent.txt")
    for raw in path.read_text().splitlines() if path.exists() else []:
        if raw.strip() and not raw.startswith("#"):
            module, operator, line, reason = (p.strip() for p in raw.split(" | ", 3))
            out[(module, operator, line)] = reason
    return out


def record(db_path: Path, mutant: Mutant, outcome: str, diff: str, tail: str) -> None:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    test = {"killed": TestOutcome.KILLED, "timeout": TestOutcome.KILLED,
            "survived": TestOutcome.SURVIVED}[outcome]  # fmt: skip
    worker = WorkerOutcome.ABNORMAL if outcome == "timeout" else WorkerOutcome.NORMAL
    with use_db(str(db_path), WorkDB.Mode.open) as db:
        db.set_result(mutant.job_id, WorkResult(worker, tail, test, diff))


# -- which tests run a mutated line ---------------------------------------------------------
def coverage_map(tree: Path, module: str, tests: tuple[str, ...], marker: str) -> dict:
    """Per line of ``module``: the tests (node ids of test functions) that ran it, from
    one run of ``tests`` under coverage with a context per test function."""
    import coverage

    rc = WORK / "coveragerc"
    rc.write_text("[run]\ndynamic_context = test_function\n")
    data_file = WORK / (module.replace("/", ".") + ".coverage")
    data_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", f"--data-file={data_file}",
           f"--include=*/{module}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
           marker, *tests]  # fmt: skip
    subprocess.run(cmd, cwd=tree, env=test_env(tree), capture_output=True, text=True)
    data = coverage.CoverageData(basename=str(data_file))
    data.read()
    measured = [f for f in data.measured_files() if f.endswith("/" + module)]
    out: dict[int, set[str]] = {}
    for name in measured:
        for line, contexts in data.contexts_by_lineno(name).items():
            # "": run while no test ran (a test module's import, building its constants)
            out.setdefault(line, set()).update(_node_id(c) if c else "*" for c in contexts)
    return out


def _node_id(context: str) -> str:
    """``tests.test_x.test_y`` (a coverage context) -> ``tests/test_x.py::test_y``; ``*``
    for a context that is not a test of ours (hypothesis runs a test's body inside its own
    ``test_function``: which test it was is not known)."""
    parts = context.split(".")
    for k in range(len(parts) - 1, 0, -1):
        path = "/".join(parts[:k]) + ".py"
        if path.startswith("tests/") and (ROOT / path).exists():
            return "::".join([path, *parts[k:]])
    return "*"


class Place(NamedTuple):
    lines: range  # the lines of the statement's own text (a compound one's header)
    in_function: bool
    compiled: bool  # inside a Numba kernel: coverage cannot see it run


def places(source: str) -> list[Place]:
    """Every statement of the module: where it is and what coverage can say of it."""
    found: list[Place] = []

    def visit(node: ast.AST, in_function: bool, compiled: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                body = getattr(child, "body", None)
                end = (body[0].lineno - 1 if isinstance(body, list) and body
                       else child.end_lineno)  # fmt: skip
                found.append(Place(range(child.lineno, max(end, child.lineno) + 1),
                                   in_function, compiled))  # fmt: skip
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                kernel = compiled or any("njit" in ast.dump(d) for d in child.decorator_list)
                visit(child, True, kernel)
            else:
                visit(child, in_function, compiled)

    visit(ast.parse(source), False, False)
    return found


def selected(line: int, where: list[Place], covered: dict[int, set[str]],
             everything: tuple[str, ...]) -> tuple[str, ...]:  # fmt: skip
    """The tests to run for a mutant on ``line``: every test of the files whose tests ran
    its statement; all of them for module-level code (run at import) and kernels; none
    when no test ran it. Whole files, not the tests that ran it: a part built once and
    kept (``tests/thresholds.py`` keeps each configuration's customer step) runs its
    constructor in whichever test came first, yet every test of the file uses it."""
    inner = min((p for p in where if line in p.lines), key=lambda p: len(p.lines), default=None)
    if inner is None or not inner.in_function or inner.compiled:
        return everything
    tests = set().union(*(covered.get(k, set()) for k in inner.lines))
    if "*" in tests:
        return everything
    files = {t.split("::", 1)[0] for t in tests}
    return tuple(t for t in everything if t in files)


def tests_of(module: str) -> tuple[str, ...]:
    tests = TESTS.get(module)
    if tests is None:
        guess = f"tests/test_{Path(module).stem}.py"
        tests = (guess,)
    return tuple(t for t in tests if (ROOT / t).exists())


def run_module(module: str, sample: int, seed: int, trees: list[Path], log) -> dict:
    """Run a module's mutants (all, or a fixed sample), one worker per tree; returns
    its tally."""
    tests = tests_of(module)
    if not tests:
        log(f"{module}: no tests mapped, skipped")
        return {"module": module, "skipped": True}
    db_path = WORK / (module.replace("/", ".") + ".sqlite")
    mutants = mutants_of(module, db_path)
    chosen = mutants if not sample or sample >= len(mutants) else sorted(
        random.Random(seed).sample(mutants, sample), key=lambda m: (m.line, m.operator))
    original = (ROOT / module).read_text()
    started = time.monotonic()
    for tree in trees:
        (tree / module).write_text(original)
    marker = MARKERS.get(module, FAST)
    status, tail = run_tests(trees[0], tests, 900, test_env(trees[0]), marker)  # warms cache
    base_s = time.monotonic() - started
    if status != "survived":
        log(f"{module}: the tests fail unmutated, skipped:\n{tail}")
        return {"module": module, "skipped": True, "error": tail}
    stale = stale_kernels(module)
    if stale:  # what a run with every kernel compiled afresh takes
        clear_kernels(trees[0], stale)
        started_cold = time.monotonic()
        run_tests(trees[0], tests, 900, test_env(trees[0]), marker)
        base_s = max(base_s, time.monotonic() - started_cold)
    timeout = max(30.0, 3 * base_s)
    covered = coverage_map(trees[0], module, tests, marker)
    stmts = places(original)
    log(f"{module}: {len(chosen)} of {len(mutants)} mutants; tests {' '.join(tests)} "
        f"take {base_s:.1f} s unmutated")  # fmt: skip
    same = equivalents()
    tally = {"module": module, "total": len(mutants), "run": 0, "killed": 0, "survived": 0,
             "timeout": 0, "equivalent": 0, "no_mutation": 0, "survivors": [],
             "equivalents": []}  # fmt: skip
    lines = original.splitlines()
    lock = threading.Lock()
    free = list(trees)
    done = [0]

    def one(mutant: Mutant) -> None:
        code = mutate(original, mutant)
        if code is None:
            with lock:
                tally["no_mutation"] += 1
            return
        text = lines[mutant.line - 1].strip()
        changed = next((b.strip() for a, b in zip(lines, code.splitlines(), strict=False)
                        if a != b), "")  # fmt: skip
        where = f"{module}:{mutant.line} {mutant.operator}: {text!r} -> {changed!r}"
        reason = same.get((module, mutant.operator, text))
        chosen_tests = selected(mutant.line, stmts, covered, tests)
        if annotation_only(original, code):
            outcome, tail = "survived", ""
            reason = "an annotation, never evaluated (PEP 563)"
        elif not chosen_tests:
            outcome, tail = "survived", "no test runs this line"
            where += " (no test runs it)"
        else:
            with lock:
                tree = free.pop()
            try:
                (tree / module).write_text(code)
                clear_kernels(tree, stale)
                outcome, tail = run_tests(tree, chosen_tests, timeout, test_env(tree), marker,
                                          mutant=True)  # fmt: skip
            finally:
                (tree / module).write_text(original)
                clear_kernels(tree, stale)  # they hold the mutant now
                with lock:
                    free.append(tree)
        with lock:
            tally["run"] += 1
            tally[outcome] += 1
            record(db_path, mutant, outcome, f"- {text}\n+ {changed}", tail)
            if outcome == "survived":
                if reason:
                    tally["equivalent"] += 1
                    tally["equivalents"].append(f"{where} ({reason})")
                else:
                    tally["survivors"].append(where)
            done[0] += 1
            log(f"  [{done[0]}/{len(chosen)}] {outcome:8} {where}")

    try:
        with ThreadPoolExecutor(len(trees)) as pool:
            list(pool.map(one, chosen))
    finally:
        for tree in trees:
            (tree / module).write_text(original)
    judged = tally["run"] - tally["equivalent"]
    killed = tally["killed"] + tally["timeout"]
    tally["score"] = round(100 * killed / judged, 1) if judged else None
    tally["seconds"] = round(time.monotonic() - started)
    return tally


def changed_modules(ref: str) -> list[str]:
    names = subprocess.run(["git", "diff", "--name-only", ref, "--"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    return [n for n in names if n.endswith(".py") and n.split("/")[0] in
            ("operators", "state", "flows") and not n.endswith("__init__.py")]  # fmt: skip


def all_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for package in ("operators", "state", "flows")
                  for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", help="a module path (repeat); default all")
    parser.add_argument("--sample", type=int, default=0, help="mutants per module (0: all)")
    parser.add_argument("--seed", type=int, default=39)
    parser.add_argument("--changed", metavar="REF", help="only modules changed since REF")
    parser.add_argument("--out", type=Path, help="write the tallies as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("--work", type=Path, default=WORK,
                        help="where the copies of the tree and the sessions are kept")  # fmt: skip
    args = parser.parse_args(argv)
    modules = args.module or (changed_modules(args.changed) if args.changed else all_modules())
    WORK = args.work.resolve()
    WORK.mkdir(exist_ok=True)
    trees = [WORK / f"tree{k}" for k in range(max(1, args.jobs))]
    for tree in trees:
        make_tree(tree)
    tallies = []

    def log(text: str) -> None:
        print(text, flush=True)

    for module in modules:
        try:
            tally = run_module(module, args.sample, args.seed, trees, log)
        except RuntimeError as exc:  # one module's trouble does not end the others' run
            log(f"{module}: not run: {exc}")
            tally = {"module": module, "skipped": True, "error": str(exc)}
        tallies.append(tally)
        if not tally.get("skipped"):
            log(f"{module}: score {tally['score']} % ({tally['killed']} killed, "
                f"{tally['timeout']} timed out, {len(tally['survivors'])} survived, "
                f"{tally['equivalent']} equivalent) in {tally['seconds']} s")  # fmt: skip
        if args.out:
            args.out.write_text(json.dumps(tallies, indent=1))
    print("\nmodule | mutants | run | killed | survived | equivalent | score")
    for t in tallies:
        if not t.get("skipped"):
            print(f"{t['module']} | {t['total']} | {t['run']} | {t['killed'] + t['timeout']} | "
                  f"{len(t['survivors'])} | {t['equivalent']} | {t['score']} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
