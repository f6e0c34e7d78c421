"""wandb: a run online or offline (`wandb sync` later), continued across resumes by the id a checkpoint
keeps; and the checks that refuse a mode that cannot work before anything starts."""
from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlsplit

from cifar_dist.config import WandbConfig
from cifar_dist.engine.run_log import LogSink
from cifar_dist.errors import ConfigError
from cifar_dist.run_files import per_class_rows

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 8
DEFAULT_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 5.0


def api_key_found(base_url: str) -> bool:
    """Whether wandb will find credentials: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a netrc entry
    for the server (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(base_url).hostname or ""
    for path in filter(None, (os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc")):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def server_reachable(base_url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the wandb server opens within timeout_s."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except (OSError, TypeError):
        return False


def check_wandb(cfg: WandbConfig) -> None:
    """Refuse a wandb mode that cannot work (no package; online without credentials) before anything
    starts; every rank calls it, so all stop together."""
    if cfg.mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb.mode={cfg.mode} needs the 'wandb' package: pip install -e .[wandb], "
                          "or set logging.wandb.mode=disabled")
    if cfg.mode != "online":
        return
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_URL)
    if not api_key_found(base_url):
        raise ConfigError(f"logging.wandb.mode=online needs a wandb API key for {base_url}: run `wandb login` or "
                          "set WANDB_API_KEY, or use logging.wandb.mode=offline and `wandb sync` the run later")


class WandbRun(LogSink):
    def __init__(self, run_dir: Path, cfg: WandbConfig, config_dict: dict, run_id: str | None):
        check_wandb(cfg)
        import wandb

        mode = cfg.mode
        base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_URL)
        if mode == "online" and not server_reachable(base_url):
            print(f"warning: wandb server {base_url} is not reachable within {PROBE_TIMEOUT_S:.0f} s; "
                  "logging offline instead (upload later with `wandb sync`)", flush=True)
            mode = "offline"
        self.run_dir = Path(run_dir)
        resuming = run_id is not None
        # Chosen here rather than by wandb so that the first checkpoint can already store it.
        self.run_id = run_id or "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=cfg.name or None, tags=list(cfg.tags),
            config=config_dict, mode=mode, dir=str(run_dir), id=self.run_id, resume="allow" if resuming else None,
            reinit="create_new",  # never hand back another run that happens to be active in this process
            settings=wandb.Settings(silent=True, init_timeout=60),
        )
        if mode == "offline":
            print(f"wandb: offline run {self.run.id} in {Path(self.run.dir).parent}; "
                  f"upload it with `wandb sync {Path(self.run.dir).parent}`", flush=True)
        else:
            print(f"wandb: run {self.run.id} at {self.run.url}", flush=True)

    def end_epoch(self, record: dict, history: list[dict]) -> None:
        if "global_step" in record:
            self.run.log(record, step=int(record["global_step"]))
        else:
            self.run.log(record)

    def final(self, final: dict, scores: dict[str, dict], confusion, class_names) -> None:
        import wandb

        columns, rows = per_class_rows(class_names, scores)
        long_form = [[actual, predicted, int(confusion[i][j])]
                     for i, actual in enumerate(class_names) for j, predicted in enumerate(class_names)]
        # wandb.plot.confusion_matrix wants every prediction; this is the chart it would build.
        confusion_chart = wandb.plot_table(
            "wandb/confusion_matrix/v1", wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=long_form),
            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
            {"title": "Confusion matrix"})
        self.run.log({"per_class": wandb.Table(columns=columns, data=rows), "confusion_matrix": confusion_chart,
                      **{f"final/{kind}_acc": r["acc"] for kind, r in (final or {}).items()}})

    def attach(self, paths: list[Path]) -> None:
        """The files as one artifact of the run (uploaded with it, or by `wandb sync` when offline)."""
        import wandb

        artifact = wandb.Artifact(f"{paths[0].parent.name}-{self.run.id}", type=paths[0].parent.name)
        for path in paths:
            artifact.add_file(str(path), name=str(Path(path).relative_to(self.run_dir)))
        self.run.log_artifact(artifact)

    def close(self) -> None:
        import wandb

        if self.run is None:
            return
        self.run.finish()
        self.run = None
        # finish() can return before wandb's service has written the run's .wandb file; teardown waits for
        # it. Its atexit hook would too, but multiprocessing children skip it.
        wandb.teardown()
