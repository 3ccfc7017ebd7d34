"""The package's layers point one way: data below models and inference, those
below evaluation, plotting and the drivers. Checked on the source (`ast`), not
by importing it, plus one import in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dlfb_localization"
NAME = PACKAGE.name

# What the modules under each folder (or the one module) must not import.
FORBIDDEN = {
    "dataset": ("inspect", "evaluate", "embeddings", "train", "matplotlib"),
    "inspect": ("evaluate", "train"),
    "train.py": ("evaluate", "embeddings", "invariance.score"),
}
# The exceptions, each with its reason. The chapter calls
# `dataset.plot_random_frames(...)`, so `Dataset` keeps that method; it imports
# its drawing on call, never when `dataset` is imported.
ALLOWED_ON_CALL = {("dataset/dataset.py", "inspect.frames")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """`(imported module, at import time?)` for every import statement in the
    file; `from a import b` gives `a.b` too (b may be a module). Imports inside
    a function body run only when it is called."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0]
    if path.name == "__init__.py":
        package = _module_name(path)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, at_import) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this package
                    anchor = package.rsplit(".", child.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                found.append((base, at_import))
                found.extend((f"{base}.{a.name}", at_import) for a in child.names)
            visit(
                child,
                at_import
                and not isinstance(
                    child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
                ),
            )

    visit(tree, True)
    return found


def _matches(module: str, target: str) -> bool:
    """Whether `module` is `target` (a package-relative name, or a top-level
    package such as matplotlib) or inside it."""
    full = target if target == "matplotlib" else f"{NAME}.{target}"
    return module == full or module.startswith(full + ".")


def _files(scope: str) -> list[Path]:
    if scope.endswith(".py"):
        return [PACKAGE / scope]
    return sorted((PACKAGE / scope).rglob("*.py"))


@pytest.mark.parametrize("scope", list(FORBIDDEN))
def test_no_arrow_points_back_up(scope):
    files = _files(scope)
    assert files, f"nothing to check under {scope}"
    violations = []
    for path in files:
        relative = path.relative_to(PACKAGE).as_posix()
        for module, at_import in _imports(path):
            for target in FORBIDDEN[scope]:
                if not _matches(module, target):
                    continue
                if not at_import and any(
                    relative == allowed_file and _matches(module, allowed)
                    for allowed_file, allowed in ALLOWED_ON_CALL
                ):
                    continue
                violations.append(f"{relative} imports {module}")
    assert violations == []


def test_the_allowed_exceptions_are_still_needed_and_run_only_on_call():
    for relative, target in ALLOWED_ON_CALL:
        module = f"{NAME}.{target}"
        imports = _imports(PACKAGE / relative)
        assert (module, False) in imports, f"{relative} no longer needs {module}"
        assert (module, True) not in imports


def _import_time_closure(module: str) -> set[str]:
    """Every package module that importing `module` runs, from the source:
    its import-time imports, transitively, with each one's parent packages."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for end in range(1, len(parts) + 1):  # a module runs its packages first
            parent = ".".join(parts[:end])
            if parent in files and parent not in seen:
                seen.add(parent)
                pending.extend(
                    imported
                    for imported, at_import in _imports(files[parent])
                    if at_import and imported.split(".")[0] == NAME
                )
    return seen


def test_training_does_not_reach_evaluation_code_through_any_package():
    closure = _import_time_closure(f"{NAME}.train")
    assert f"{NAME}.train" in closure and f"{NAME}.model.vqvae" in closure
    reached = {
        module
        for module in closure
        for target in ("evaluate", "embeddings", "invariance", "inspect")
        if _matches(module, target)
    }
    assert reached == set()


def test_importing_train_imports_no_evaluation_code():
    """Nor scikit-learn (~2 s to import), which only evaluation and the
    codebook's k-means initialisation use."""
    code = (
        "import sys, dlfb_localization.runs; "
        "print('dlfb_localization.evaluate' in sys.modules, "
        "'dlfb_localization.embeddings' in sys.modules, "
        "'dlfb_localization.invariance.score' in sys.modules, "
        "'sklearn' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["False", "False", "False", "False"]
