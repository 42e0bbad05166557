"""Logger construction, with W&B that never blocks on a login prompt."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    """True when W&B could log in without asking: an API key in the environment, an
    identity-token file, or a netrc entry for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    candidates = [os.environ.get("NETRC"), "~/.netrc", "~/_netrc"]
    for candidate in filter(None, candidates):
        path = Path(candidate).expanduser()
        if not path.exists():
            continue
        try:
            auth = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return False
        return bool(auth and auth[2])
    return False


def build_loggers(
    cfg: DictConfig | None, group: str | None = None, run_ids: dict[str, str] | None = None
) -> list[Logger]:
    """Instantiate every logger under ``cfg`` (a dict of ``_target_`` nodes).

    W&B runs online only when ``WANDB_MODE`` says so or credentials exist; otherwise it
    runs offline and says how to upload the run later. ``group`` groups multirun jobs.
    ``run_ids["wandb"]`` (stored in the checkpoint a run continues from) makes W&B resume
    that run instead of starting another.
    """
    loggers: list[Logger] = []
    for name, node in (cfg or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        if node._target_.endswith("WandbLogger"):
            node = node.copy()
            with open_dict(node):
                offline = _wandb_offline(bool(node.get("offline", False)), node.get("save_dir"))
                node.offline = offline
                if group and not node.get("group"):
                    node.group = group
                if (run_ids or {}).get("wandb"):
                    node.id = run_ids["wandb"]
                    node.resume = "allow"
        logger = instantiate(node)
        if not isinstance(logger, Logger):
            raise ValueError(f"logger.{name} is a {type(logger).__name__}, not a Lightning Logger")
        loggers.append(logger)
    return loggers


def _wandb_offline(requested: bool, save_dir: str | None) -> bool:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if requested or mode in ("offline", "dryrun", "disabled"):
        return True
    if mode == "online" or wandb_has_credentials():
        return False
    _say_offline(Path(save_dir or ".") / "wandb")
    return True


@rank_zero_only
def _say_offline(where: Path) -> None:
    log.warning(
        "wandb: no API key found, logging offline to %s. Upload later with "
        "`wandb sync %s/offline-run-*` after `wandb login`.",
        where,
        where,
    )


def finish_loggers(loggers: list[Logger]) -> None:
    """Close W&B runs so the next job of a multirun starts a run of its own."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
