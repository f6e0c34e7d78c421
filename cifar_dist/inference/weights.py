"""Trained weights for inference: a cifar_dist checkpoint, or a state dict saved by the reference project.

A cifar_dist checkpoint brings its config; overrides (`data.root=...`, `train.device=cpu`) change
where the data is and how to run, not the model. A reference state dict (`best_ema_model.pth`)
names its modules conv1, bn1, layer1…layer4 (two blocks each), extra_conv, extra_bn and fc; it
is mapped onto `attention_resnet` by structure: group by group, its tensors in saved order must
match ours one to one in shape and kind, or the load fails naming the first that does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifar_dist.config import Config, apply_overrides, config_from_dict, load_config
from cifar_dist.engine import checkpoint
from cifar_dist.engine.build import build_model_for
from cifar_dist.errors import CheckpointError, ConfigError, one_line

WEIGHTS = ("model", "ema")
# Reference module → the prefixes of ours that hold the same tensors, in the same order.
REFERENCE_LAYOUT = {
    "conv1": ("stem.0.0.",), "bn1": ("stem.0.1.",),
    "layer1": ("stages.0.", "stages.1."), "layer2": ("stages.2.", "stages.3."),
    "layer3": ("stages.4.", "stages.5."), "layer4": ("stages.6.", "stages.7."),
    "extra_conv": ("head.0.0.",), "extra_bn": ("head.0.1.",), "fc": ("fc.",),
}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / AveragedModel, torch.compile
WRAPPER_EXTRAS = ("n_averaged",)  # AveragedModel's counter, not a weight


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on the CPU) and what it came from."""

    model: nn.Module
    cfg: Config
    weights: str  # "model", "ema" or "reference"
    path: Path

    def on(self, device: torch.device) -> nn.Module:
        """The model moved to device, in the memory format the config asks for."""
        model = self.model.to(device)
        return model.to(memory_format=torch.channels_last) if self.cfg.train.channels_last else model


def load_model(path: str | Path, weights: str | None = None, overrides: list[str] = ()) -> LoadedModel:
    """Build the model a checkpoint or reference state dict describes and load its weights (strictly).

    weights: "model" or "ema"; None takes the EMA when the checkpoint has one.
    """
    path = Path(path)
    state = checkpoint.read(path)
    if isinstance(state, dict) and "format_version" in state:
        checkpoint.check(state, path, for_resume=False)
        try:
            saved = config_from_dict(state["config"])
        except ConfigError as err:
            raise CheckpointError(f"checkpoint {path}: its saved config does not load ({one_line(err)})") from None
        cfg = apply_overrides(saved, list(overrides))
        weights = weights or ("ema" if state.get("ema") else "model")
        if weights == "ema" and not state.get("ema"):
            raise CheckpointError(f"checkpoint {path} holds no EMA weights (trained with train.ema_decay=0); "
                                  "use --weights model")
        tensors = state["ema"]["module"] if weights == "ema" else state["model"]
        model = build_model_for(cfg, torch.device("cpu"), channels_last=False)
        try:
            model.load_state_dict(tensors)
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {path}: its {weights} weights do not fit model.name={cfg.model.name} "
                                  f"with the given overrides ({one_line(err)})") from None
    elif isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        tensors = reference_tensors(state, path)
        cfg = load_config(None, ["model.name=attention_resnet", f"model.width={tensors['conv1.weight'].shape[0]}",
                                 f"model.num_classes={tensors['fc.weight'].shape[0]}", *overrides])
        model = build_model_for(cfg, torch.device("cpu"), channels_last=False)
        model.load_state_dict(map_reference(tensors, model.state_dict(), path))
        weights = "reference"
    else:
        raise CheckpointError(f"{path} is neither a cifar_dist checkpoint nor a state dict of tensors "
                              f"(found {type(state).__name__}); pass a run's best_ema.pt / last.pt or the reference "
                              "project's best_ema_model.pth")
    return LoadedModel(model.eval(), cfg, weights, path)


def reference_tensors(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """The state dict without wrapper prefixes, checked to have the reference model's top-level modules."""
    tensors = {}
    for key, tensor in state.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key not in WRAPPER_EXTRAS:
            tensors[key] = tensor
    found = list(dict.fromkeys(key.split(".")[0] for key in tensors))
    missing = [name for name in REFERENCE_LAYOUT if name not in found]
    unexpected = [name for name in found if name not in REFERENCE_LAYOUT]
    if missing or unexpected or "conv1.weight" not in tensors or "fc.weight" not in tensors:
        raise CheckpointError(f"{path} is not a state dict of the reference attention ResNet: expected the modules "
                              f"{', '.join(REFERENCE_LAYOUT)}; missing {', '.join(missing) or 'none'}, unexpected "
                              f"{', '.join(unexpected) or 'none'}")
    return tensors


def map_reference(tensors: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], path: Path) -> dict:
    """Our state dict filled with the reference tensors, module by module, in saved order."""
    mapped = {}
    for reference_name, prefixes in REFERENCE_LAYOUT.items():
        theirs = [(key, t) for key, t in tensors.items() if key.split(".")[0] == reference_name]
        mine = [(key, t) for key, t in ours.items() if key.startswith(prefixes)]
        if len(theirs) != len(mine):
            raise CheckpointError(f"{path}: reference module {reference_name} holds {len(theirs)} tensors, "
                                  f"attention_resnet's {' + '.join(prefixes)} holds {len(mine)}: another architecture")
        for (their_key, their), (my_key, my) in zip(theirs, mine):
            if their.shape != my.shape or their.is_floating_point() != my.is_floating_point():
                raise CheckpointError(
                    f"{path}: reference tensor {their_key} ({tuple(their.shape)}, {their.dtype}) does not fit "
                    f"{my_key} ({tuple(my.shape)}, {my.dtype}) of attention_resnet of width "
                    f"{ours['stem.0.0.weight'].shape[0]}: another architecture")
            mapped[my_key] = their
    return mapped
