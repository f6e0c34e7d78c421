"""Config grammar: defaults, YAML files, dotted overrides, validation; the CLI around it."""
from __future__ import annotations

import pytest

import yaml

from cifar_dist.config import config_from_dict, config_to_dict, config_to_yaml, iter_keys, load_config
from cifar_dist.errors import ConfigError
from cifar_dist.engine.build import preflight
from conftest import REPO, balanced_labels, id_images, run_cli, write_batches_folder


def test_defaults_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1\nlogging:\n  wandb:\n    mode: offline\n    tags: [a, b]\n")
    cfg = load_config(path, ["train.epochs=9", "model.name=fast", "model.widths=[8, 16, 32]", "data.loader=gpu"])
    assert cfg.train.epochs == 9 and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.logging.wandb.mode == "offline" and cfg.logging.wandb.tags == ["a", "b"]
    assert cfg.model.options["widths"] == [8, 16, 32] and cfg.data.loader == "gpu"
    assert cfg.data.val_fraction == 0.1 and cfg.data.beton_path().as_posix() == "data/beton"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_string_keys_keep_yaml_words_and_quotes():
    cfg = load_config(None, ["train.sync_bn=off", 'model.name="fast"', "run.name=0123"])
    assert (cfg.train.sync_bn, cfg.model.name, cfg.run.name) == ("off", "fast", "0123")


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key 'train.epoch'.*did you mean 'train.epochs'"),
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.global_batch_size=3.5", "'train.global_batch_size' expects int, got 3.5"),
    ("train.tta=3", "'train.tta' must be one of 0, 1, 2"),
    ("train.lr_units=per_image", "'train.lr_units' must be one of torch, decoupled_per_1024"),
    ("train.lr_peak_fraction=1", "'train.lr_peak_fraction' must be in \\[0, 1\\)"),
    ("train.epochs=0", "'train.epochs' must be in \\(0, inf\\)"),
    ("train.amp=maybe", "'train.amp' expects bool"),
    ("data.loader=dali", "'data.loader' must be one of ffcv, gpu, torchvision"),
    ("augment.mixup_prob=0.8", "mixup_prob \\+ augment.cutmix_prob must be at most 1"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be in \\[0, 1\\)"),
    ("train.muon.momentum=1", "'train.muon.momentum' must be in \\[0, 1\\)"),
    ("train.muon.ns_steps=0", "'train.muon.ns_steps' must be in \\[1, 20\\]"),
    ("train.muon.ns_coefficients=[1, 2]", "'train.muon.ns_coefficients' must be three numbers"),
    ("train.optimizer=adam", "'train.optimizer' must be one of sgd, muon"),
    # ranges the augmentation ops trusted a validated config for (they no longer check them)
    ("augment.hue=0.7", "'augment.hue' must be in \\[0, 0.5\\]"),
    ("augment.crop_padding=32", "'augment.crop_padding' must be in \\[0, 31\\]"),
    ("augment.flip=sideways", "'augment.flip' must be one of random, alternating, none"),
    ("train.lr", "not of the form key.sub=value"),
    ("train=3", "is a section"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_rules_between_keys():
    with pytest.raises(ConfigError, match="normalize_every_end=2 must be 0 or at least train.muon.normalize_every=3"):
        load_config(None, ["train.muon.normalize_every=3", "train.muon.normalize_every_end=2"])
    with pytest.raises(ConfigError, match="'augment.cutmix_alpha' must be > 0 when augment.cutmix_prob > 0"):
        load_config(None, ["augment.cutmix_alpha=0"])


def test_bad_yaml_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'train.epochz' in {path}"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = run_cli("prepare", "data.loadr=gpu")
    assert result.returncode == 2
    assert "unknown config key 'data.loadr'" in result.stderr and "Traceback" not in result.stderr


def test_repo_configs_load():
    for name in ("default", "fast", "smoke"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.run.name == name
    default = load_config("configs/default.yaml")
    assert (default.model.name, default.train.global_batch_size, default.train.epochs) == ("attention_resnet", 128, 500)
    assert (default.augment.mixup_prob, default.augment.cutmix_prob, default.train.ema_decay) == (0.3, 0.3, 0.999)


def test_model_summary_command():
    listing = run_cli("model-summary")
    assert listing.returncode == 0, listing.stderr
    assert "options: model.widths=[64, 256, 256], model.bn_momentum=0.6" in listing.stdout
    assert "options: model.width=31, model.dropout=0.3" in listing.stdout and "no options" in listing.stdout
    result = run_cli("model-summary", "attention_resnet", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "4,913,705" in result.stdout
    result = run_cli("model-summary", "resnet18", "model.num_classes=100", "--batch-size", "2")
    assert result.returncode == 0 and "11,220,132" in result.stdout  # 11,173,962 + 90 * 513


def test_model_name_and_options_are_checked_against_the_registry():
    # The model section is checked when the config loads: each model declares its own keys.
    with pytest.raises(ConfigError, match="'model.name' must be one of attention_resnet, fast, resnet18"):
        load_config(None, ["model.name=vgg"])
    with pytest.raises(ConfigError, match=r"'model.width' must be in \[1, inf\)"):
        load_config(None, ["model.width=0"])
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'.*did you mean model.width"):
        load_config(None, ["model.widht=3"])
    # a key of another registered model is dropped: recipe files may name several models' keys
    assert load_config(None, ["model.name=resnet18", "model.width=4"]).model.options == {}
    with pytest.raises(ConfigError, match="augment.flip=alternating is not available with data.loader=torchvision"):
        preflight(load_config(None, ["augment.flip=alternating", "data.loader=torchvision"]))
    preflight(load_config("configs/fast.yaml"))


def test_every_key_is_documented_and_the_yaml_round_trips(tmp_path):
    cfg = load_config("configs/fast.yaml", ["train.sync_bn=off", "run.name=0123", "logging.wandb.tags=[a, b]"])
    keys = list(iter_keys(cfg))
    assert len(keys) > 70 and all(key.help for _, _, key in keys)
    text = config_to_yaml(cfg, header="first line\nsecond")
    assert text.startswith("# first line\n# second\n")
    assert "  flip: alternating  # " in text and "[random | alternating | none]" in text
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert yaml.safe_load(text)["train"]["sync_bn"] == "off"  # quoted, not YAML's boolean


def test_config_command_prints_resolved_keys_and_help_points_to_it():
    result = run_cli("config", "--config", "configs/fast.yaml", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)
    assert parsed["train"]["epochs"] == 3.0 and parsed["model"]["name"] == "fast"
    assert "# registered model" in result.stdout
    for command in ("train", "prepare", "config"):
        help_text = run_cli(command, "--help").stdout
        assert "cifar-dist config" in help_text, command
    bad = run_cli("config", "train.epohcs=3")
    assert bad.returncode == 2 and "did you mean 'train.epochs'" in bad.stderr


def test_a_model_from_run_imports_brings_its_own_keys(tmp_path):
    """A model registered in a module of the user's (run.imports) declares model.nan_after; the key is
    described by `cifar-dist config`, range-checked, saved with the run, and the model trains."""
    env = {"PYTHONPATH": str(REPO / "tests" / "scripts")}
    own = ["run.imports=[tiny_models]", "model.name=nan_after"]
    described = run_cli("config", *own, "model.nan_after=1000", env=env)
    assert described.returncode == 0, described.stderr
    assert "  nan_after: 1000  # nan_after: training forwards before the logits turn NaN [0, inf)" in described.stdout
    bad = run_cli("config", *own, "model.nan_after=-1", env=env)
    assert bad.returncode == 2 and "'model.nan_after' must be in [0, inf)" in bad.stderr
    data = tmp_path / "data"
    write_batches_folder(data, id_images(100), balanced_labels(100), id_images(20, seed=1), balanced_labels(20))
    run_dir = tmp_path / "run"
    trained = run_cli("train", "--config", "configs/smoke.yaml", *own, "model.nan_after=1000", f"data.root={data}",
                      "data.require_full_size=false", "train.global_batch_size=16", "train.epochs=1",
                      f"run.dir={run_dir}", env=env)
    assert trained.returncode == 0, trained.stderr[-4000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == {"name": "nan_after", "num_classes": 10, "nan_after": 1000}


def test_the_head_must_fit_cifar10_and_train_refuses_before_any_work(tmp_path):
    for classes in (5, 100):
        result = run_cli("train", "--config", "configs/smoke.yaml", f"model.num_classes={classes}",
                         f"run.dir={tmp_path / 'run'}")
        assert result.returncode == 2 and f"model.num_classes={classes}, but CIFAR-10 has 10 classes" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    result = run_cli("train", "--config", "configs/smoke.yaml", "run.dir=/proc/cifar_dist_run")
    assert result.returncode == 2 and "run.dir /proc/cifar_dist_run cannot be written" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cifar_dist ")
