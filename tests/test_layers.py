"""The house by layers: imports point down only, no cycles, the public API at the top.

The rules are read from the source (``ast``), so an import inside a function, under
``TYPE_CHECKING`` or one made to break a cycle counts like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ddpm
from tests.conftest import ROOT

PACKAGE = ROOT / "ddpm"

# layer -> the layers it may import (besides itself); runs -> training / evaluation / data
# -> diffusion / nets, and utils under everything
ALLOWED = {
    "utils": set(),
    "diffusion": {"utils"},
    "nets": {"utils"},
    "data": {"utils"},
    "evaluation": {"data", "utils"},
    "training": {"diffusion", "nets", "data", "evaluation", "utils"},
    "runs": {"training", "evaluation", "data", "diffusion", "nets", "utils"},
}
# layer -> third-party packages it must not import
FORBIDDEN = {
    "utils": {"lightning", "pytorch_lightning", "hydra", "omegaconf"},
    "diffusion": {"lightning", "pytorch_lightning", "hydra", "omegaconf"},
    "nets": {"lightning", "pytorch_lightning", "hydra", "omegaconf"},
    "data": {"hydra", "omegaconf"},
    "evaluation": {"hydra", "omegaconf"},
    "training": {"hydra", "omegaconf"},
    "runs": set(),
}


def module_name(path: Path, root: Path) -> str:
    """``root/ddpm/a/b.py`` -> ``ddpm.a.b``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file: a ddpm module (``from a import
    b`` names ``a.b`` when that is a module), or the top-level name of a third-party one."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 parents
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if full in modules else base))
    return found


def layer_of(module: str) -> str | None:
    """``ddpm.training.module`` -> ``training``; the top-level ``ddpm`` (the API) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def check_tree(root: Path, name: str = "ddpm") -> list[str]:
    """Every broken rule in the package ``root/name``, one line each."""
    files = sorted((root / name).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    problems, graph = [], {m: set() for m in modules}
    for sub in sorted(p.name for p in (root / name).iterdir() if (p / "__init__.py").is_file()):
        if sub not in ALLOWED:
            problems.append(f"{name}/{sub}/ is no known layer: give it a place in ALLOWED")
    for f in files:
        here = module_name(f, root)
        layer = layer_of(here)
        where = str(f.relative_to(root))
        for line, target in imports_of(f, root, modules):
            top = target.split(".")[0]
            if top != name:
                if layer is not None and top in FORBIDDEN.get(layer, set()):
                    problems.append(f"{where}:{line}: the {layer} layer imports {top}")
                continue
            if target in modules:
                graph[here].add(target)
            other = layer_of(target)
            if other is None:
                problems.append(f"{where}:{line}: imports the top-level package {target}")
            elif layer is not None and other != layer and other not in ALLOWED.get(layer, ()):
                problems.append(f"{where}:{line}: {layer} imports {target} ({other} is not below)")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk closes (each back edge: the path from a module back to
    itself); a graph without any has none, one with a cycle has at least one back edge."""
    found: list[list[str]] = []
    done: set[str] = set()
    path: list[str] = []

    def visit(v: str) -> None:
        path.append(v)
        for w in sorted(graph[v]):
            if w in path:
                found.append([*path[path.index(w) :], w])
            elif w not in done:
                visit(w)
        path.pop()
        done.add(v)

    for v in sorted(graph):
        if v not in done:
            visit(v)
    return found


def test_imports_point_down_the_layers_without_cycles():
    assert check_tree(ROOT) == []


def test_every_layer_says_in_one_line_what_it_holds_and_may_import():
    for layer in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "\n" not in doc and "import" in doc, layer


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "ddpm" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [tmp_path / "ddpm", *(tmp_path / "ddpm").rglob("*")]:
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text('"""x"""\n')
    return tmp_path


def test_the_checker_finds_a_cycle_an_upward_import_and_a_forbidden_package(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "runs/cli.py": "from ddpm.runs import prepare\n",
            "runs/prepare.py": "def f():\n    from ddpm.runs.cli import x\n",  # the old cycle
            "diffusion/math.py": "import lightning\nfrom ddpm.training.module import M\n",
            "diffusion/schedules.py": "x = 1\n",
            "training/module.py": "from .. import diffusion\nfrom ..diffusion.schedules import x\n",
            "extra/thing.py": "x = 1\n",
        },
    )
    problems = check_tree(root)
    assert "import cycle: ddpm.runs.cli -> ddpm.runs.prepare -> ddpm.runs.cli" in problems
    assert any("diffusion/math.py:2: diffusion imports ddpm.training.module" in p for p in problems)
    assert "ddpm/diffusion/math.py:1: the diffusion layer imports lightning" in problems
    assert "ddpm/extra/ is no known layer: give it a place in ALLOWED" in problems
    # relative imports resolve: training may import diffusion (no problem reported there)
    assert not any("training/module.py" in p for p in problems)
    assert len(problems) == 4


def test_pure_layers_load_without_lightning_or_hydra():
    """What the layers' rules promise, checked on real imports in a fresh interpreter:
    the math, the nets and the top-level package itself import no Lightning or Hydra."""
    code = (
        "import sys, ddpm, ddpm.utils.files, ddpm.utils.images, ddpm.nets.unet;"
        "import ddpm.diffusion.samplers, ddpm.diffusion.objectives, ddpm.diffusion.schedules;"
        "from ddpm import NoiseSchedule, DDIMSampler, UNet;"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra', "
        "'omegaconf', 'pytorch_lightning'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_public_api_is_importable_from_the_top():
    from ddpm import (
        DDIMSampler,
        DDPMSampler,
        DiffusionModule,
        DPMSolverSampler,
        ImageDataModule,
        NoiseSchedule,
        UNet,
    )

    assert sorted(ddpm.__all__) == sorted(ddpm._API)
    exported = [DDIMSampler, DDPMSampler, DPMSolverSampler, DiffusionModule, ImageDataModule]
    homes = {cls.__name__: cls.__module__ for cls in [*exported, NoiseSchedule, UNet]}
    assert homes == {
        "DDIMSampler": "ddpm.diffusion.samplers.ddim",
        "DDPMSampler": "ddpm.diffusion.samplers.ddpm",
        "DPMSolverSampler": "ddpm.diffusion.samplers.dpm_solver",
        "DiffusionModule": "ddpm.training.module",
        "ImageDataModule": "ddpm.data.datamodule",
        "NoiseSchedule": "ddpm.diffusion.schedules",
        "UNet": "ddpm.nets.unet",
    }
    assert set(ddpm.__all__) <= set(dir(ddpm))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ddpm.Nope  # noqa: B018


def test_no_module_is_over_400_lines():
    long = {
        str(f.relative_to(ROOT)): n
        for f in PACKAGE.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 400
    }
    assert long == {}
