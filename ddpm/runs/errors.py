"""Bad input from the user: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def user_error(exc: BaseException) -> str | None:
    """The message of the ValueError/UsageError at the root of ``exc``, if there is one."""
    while exc is not None:
        if isinstance(exc, UsageError | ValueError | FileNotFoundError):
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        if not isinstance(exc, InstantiationException):
            return None
        exc = exc.__cause__
    return None


def run_hydra_main(main: Callable[[], Any], config_dir: Path, config_name: str) -> None:
    """Call a ``@hydra.main`` function so that a command line Hydra cannot compose (an
    unknown group option or key, an override it cannot parse) ends like every other bad
    value: one line, exit status 2, nothing written. Hydra prints those itself, over
    several lines, and exits 1; here it raises them (``HYDRA_FULL_ERROR``), and other
    errors keep their full traceback."""
    if not (config_dir / f"{config_name}.yaml").is_file():
        fail(
            f"no {config_name}.yaml in {config_dir}: the configs live in the repository's conf/, "
            "so the entry points need a checkout installed with pip install -e ."
        )
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as exc:
        fail(composition_error(exc, config_dir, config_name))


def composition_error(exc: Exception, config_dir: Path, config_name: str) -> str:
    """One line for a Hydra composition error, naming what the user can type instead."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        if group:
            return (
                f"{group}={option} is not an option of the {group} group; choose one of "
                f"{', '.join(exc.options)} (conf/{group}/)"
            )
    cause = exc.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        key = str(cause.full_key)
        hint = _close_key(key, config_dir, config_name)
        return (
            f"{key} is not a key of the config{hint}; a new key needs a +: +{key}=VALUE "
            f"(python {config_name}.py --cfg job lists the keys)"
        )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines)


def _close_key(key: str, config_dir: Path, config_name: str) -> str:
    """'' or ' (did you mean model.base_channels?)': the nearest existing key at the same
    level of the default config."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name)
    GlobalHydra.instance().clear()
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    match = difflib.get_close_matches(name, [str(k) for k in node], n=1)
    return f" (did you mean {parent + '.' if parent else ''}{match[0]}?)" if match else ""
