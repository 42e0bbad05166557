"""``PrepareFirst``: a Hydra callback that prepares a single run before Hydra writes its
folder, so a bad config leaves no trace on disk; the entry point then picks up the
prepared run (``take_prepared``) instead of building it twice."""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.runs.errors import fail, user_error
from ddpm.runs.prepare import RunComplete, prepare
from ddpm.runs.sampling import prepare_sample

_PREPARED: dict[str, Any] = {}


def take_prepared(cfg: DictConfig) -> Any:
    """The run ``PrepareFirst`` built for this very config, if any (used once)."""
    return _PREPARED.pop(_fingerprint(cfg), None)


def _fingerprint(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=False)


class PrepareFirst(HydraCallback):
    """Hydra callback: prepare a single run before Hydra writes its folder.

    Hydra creates the run folder and writes ``.hydra/`` and the log before it calls the
    task; preparing here instead means a bad value stops the run with one line and an
    empty disk. ``task`` is ``train`` or ``sample``. (In ``-m`` sweeps each job is
    prepared inside its own task.)
    """

    def __init__(self, task: str = "train") -> None:
        self.task = task

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
        with open_dict(task):
            del task["hydra"]
        key = _fingerprint(task)
        try:
            if self.task == "sample":
                _PREPARED[key] = prepare_sample(task)
                return
            with open_dict(task):
                run_folder = OmegaConf.select(config, "hydra.run.dir")
                task.paths.output_dir = os.path.abspath(str(run_folder))
            overrides = list(config.hydra.overrides.task)
            groups = set(config.hydra.runtime.choices.keys())
            _PREPARED[key] = prepare(task, overrides, groups)
        except RunComplete as done:
            print(done, file=sys.stderr)
            raise SystemExit(0) from None
        except Exception as exc:
            message = user_error(exc)
            if message is None:
                raise
            fail(message)
