"""Every ``train.py`` and ``sample.py`` command that README.md and docs/*.md show composes
against the real conf/ (Hydra's compose, no training), and a ``train.py`` command passes
the startup checks; a command the docs show with the ``error:`` line it gives gets that
line. A doc that drifts from the configs fails here."""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from ddpm.runs.errors import user_error
from ddpm.runs.prepare import prepare
from ddpm.runs.validation import ConfigError, validate_config
from tests.conftest import CONF, ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = r"(?:ddpm-(?:train|sample)|(?:train|sample)\.py)"
ENTRY = re.compile(rf"(?:^|\s){SCRIPT}(?=\s|$)")
LAUNCHER = re.compile(r"^(?:\$\s+)?(?:[A-Z_]+=\S+\s+)*(?:torchrun|srun|python|ddpm-)")
PLACEHOLDER = re.compile(r"<[^>]+>|\$\{?[A-Z_]+\}?|\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")
# Hydra flags that take a value; they are not overrides
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-name", "-cn"}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, which entry point, its overrides (one
    combination per value of a -m sweep), and the error line the docs show for it."""

    where: str
    script: str
    overrides: tuple[str, ...]
    error: str | None

    def __str__(self) -> str:
        return f"{self.where}: {self.script}.py {' '.join(self.overrides)}"


def _snippets(text: str) -> list[tuple[int, str, str | None]]:
    """(line, command text, the error line after it) of each code-block line and inline
    code span that starts with a command; continuation lines are joined."""
    found: list[tuple[int, str, str | None]] = []
    lines, inside, number = text.splitlines(), False, 0
    while number < len(lines):
        line = lines[number]
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside and LAUNCHER.match(line.strip()) and ENTRY.search(line):
            start, command = number + 1, line.strip()
            while command.endswith("\\") and number + 1 < len(lines):
                number += 1
                command = command[:-1] + " " + lines[number].strip()
            after = lines[number + 1].strip() if number + 1 < len(lines) else ""
            found.append((start, command, after if after.startswith("error:") else None))
        elif not inside:
            for span in re.findall(r"`([^`]+)`", line):
                if LAUNCHER.match(span.strip()) and ENTRY.search(span):
                    found.append((number + 1, span.strip(), None))
        number += 1
    return found


def _fill(value: str, tmp: Path) -> str:
    """Placeholders (RUN, CKPT, DIR, <date>_<time>, $SLURM_JOB_ID) become fixture paths."""
    return PLACEHOLDER.sub(lambda m: "x" if m.group(0).startswith("$") else str(tmp), value)


def _overrides(command: str, tmp: Path) -> tuple[str, list[list[str]]] | None:
    """The entry point and the override lists of ``command`` (one per value of each -m
    sweep's values, the others at their first), or None for prose that names a command."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return None
    at = next(
        i for i, t in enumerate(tokens) if re.fullmatch(r"(?:ddpm-)?(train|sample)(\.py)?", t)
    )
    script = re.sub(r"^ddpm-|\.py$", "", tokens[at])
    sweep, skip, groups = False, False, []
    for token in tokens[at + 1 :]:
        if token.startswith("["):  # [optional args], which may span tokens
            token = token[1:]
        if token.count("]") > token.count("["):
            token = token[:-1]
        if skip:
            skip = False
        elif token in ("-m", "--multirun"):
            sweep = True
        elif token in FLAGS_WITH_VALUE:
            skip = True
        elif token.startswith("-") or token == "..." or "=" not in token:
            if token not in ("...", "") and not token.startswith("-"):
                return None  # a sentence, not a command
        elif token.split("=", 1)[1] != "...":
            key, value = token.split("=", 1)
            values = value.split(",") if sweep and "[" not in value else [value]
            groups.append([f"{key}={_fill(v, tmp)}" for v in values])
    lists = [[g[0] for g in groups]]
    for i, group in enumerate(groups):
        for value in group[1:]:
            lists.append([g[0] if j != i else value for j, g in enumerate(groups)])
    return script, lists


def _commands(tmp: Path) -> list[Command]:
    out = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for line, text, error in _snippets(page.read_text()):
            parsed = _overrides(text, tmp)
            if parsed is None:
                continue
            script, lists = parsed
            for overrides in lists:
                out.append(Command(f"{name}:{line}", script, tuple(overrides), error))
    return out


def _without_missing_plugins(overrides: tuple[str, ...]) -> list[str]:
    """Drop hydra/launcher=submitit_* (and its hydra.launcher.* keys) when that optional
    plugin (pip install hydra-submitit-launcher) is not installed here."""
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        return list(overrides)
    return [o for o in overrides if not o.startswith(("hydra/launcher=", "hydra.launcher."))]


COMMANDS = _commands(Path("/tmp/docs-fixture"))


def test_the_docs_show_commands_of_both_entry_points():
    scripts = {c.script for c in COMMANDS}
    assert scripts == {"train", "sample"} and len(COMMANDS) > 60
    assert any(c.error for c in COMMANDS)  # the documented refusals are checked too


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_a_documented_command_composes(command: Command, tmp_path):
    overrides = _without_missing_plugins(command.overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=command.script, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    if command.script != "train":
        return
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(tmp_path / "run")
    if command.error is not None:  # the docs show the line this command stops with
        with pytest.raises(Exception) as info:
            prepare(cfg, list(overrides), set())
        assert f"error: {user_error(info.value)}" == command.error
        return
    try:
        validate_config(cfg)
    except ConfigError as exc:  # a GPU command, here without a GPU: no fault of the doc
        if torch.cuda.is_available() or "CUDA GPU" not in str(exc):
            raise


def test_the_extractor_reads_blocks_spans_sweeps_and_placeholders(tmp_path):
    text = "\n".join(
        [
            "Run `python train.py model=small` or:",
            "```bash",
            "$ python train.py -m optimizer.lr=1e-3,2e-3 \\",
            "    ckpt_path=RUN/checkpoints/last.ckpt [seed=3 model.channel_mults=[1,2]]  # note",
            "error: the line it gives",
            "torchrun --nproc_per_node=8 sample.py out_dir=OUT ... num_samples=4",
            "",
            "error: not a command's line: python train.py --cfg job lists the keys",
            "```",
        ]
    )
    found = [(_overrides(t, tmp_path), e) for _, t, e in _snippets(text)]
    ckpt = f"ckpt_path={tmp_path}/checkpoints/last.ckpt"
    assert found == [
        (("train", [["model=small"]]), None),
        (
            (
                "train",
                [
                    ["optimizer.lr=1e-3", ckpt, "seed=3", "model.channel_mults=[1,2]"],
                    ["optimizer.lr=2e-3", ckpt, "seed=3", "model.channel_mults=[1,2]"],
                ],
            ),
            "error: the line it gives",
        ),
        (("sample", [[f"out_dir={tmp_path}", "num_samples=4"]]), None),
    ]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    heads = re.findall(r"^#+\s+(.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_link_between_pages_reaches_a_file_and_its_heading():
    pages = [*PAGES, *sorted((ROOT / "benchmarks" / "results").glob("*/*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
