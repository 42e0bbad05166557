from lightning.pytorch.loggers import WandbLogger

from ddpm.runs.loggers import build_loggers, wandb_has_credentials
from tests.conftest import compose_train


def _no_credentials(monkeypatch, home):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_credentials_come_from_the_environment_or_netrc(monkeypatch, tmp_path):
    _no_credentials(monkeypatch, tmp_path)
    assert not wandb_has_credentials()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40)
    assert wandb_has_credentials()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert wandb_has_credentials()


def test_wandb_without_credentials_goes_offline_and_says_how_to_sync(monkeypatch, tmp_path, caplog):
    _no_credentials(monkeypatch, tmp_path)
    cfg = compose_train(["logger=wandb"], tmp_path)
    with caplog.at_level("INFO"):
        (logger,) = build_loggers(cfg.logger, group="sweep-1")
    assert isinstance(logger, WandbLogger)
    assert logger._offline
    assert logger._wandb_init["group"] == "sweep-1"
    assert "wandb sync" in caplog.text


def test_wandb_mode_online_is_respected(monkeypatch, tmp_path):
    _no_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    (logger,) = build_loggers(compose_train(["logger=wandb"], tmp_path).logger)
    assert not logger._offline
