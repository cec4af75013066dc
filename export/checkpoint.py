"""Checkpoints of a run: weights with the config that rebuilds them, the optimiser, torch's RNG
and where the training loop stands, so that a resumed run continues exactly where it stopped.

``checkpoint_last.pt`` is written at every evaluation, ``checkpoint_best.pt`` at every new best.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from export.model import ModelConfig, Transformer, make_model

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint under these names."""

    step: int = 0
    epoch: int = 0
    batch_pos: int = 0  # batches of this epoch already trained on
    elapsed_s: float = 0.0  # training seconds until the latest checkpoint
    best: dict[str, Any] | None = None  # the best dev evaluation so far
    history: list[dict[str, Any]] = field(default_factory=list)  # every dev evaluation


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint behind


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    # weights_only: a checkpoint holds tensors and plain data, never code.
    return torch.load(path, map_location=device, weights_only=True)


def model_from_checkpoint(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[Transformer, dict[str, Any]]:
    """Rebuilds the model from the config saved with its weights."""
    state = load_checkpoint(path, device)
    model = make_model(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def training_state(
    settings: dict[str, Any], model: Transformer, opt: torch.optim.Optimizer, loop: LoopState
) -> dict[str, Any]:
    """A training checkpoint: settings (configs, limits), weights, optimiser, loop, RNG."""
    return {
        **settings,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        **asdict(loop),
        "torch_rng": torch.get_rng_state(),
    }


def resume_training(
    path: Path,
    device: torch.device,
    model_cfg: ModelConfig,
    model: Transformer,
    opt: torch.optim.Optimizer,
) -> LoopState:
    """Loads the checkpoint at path into model, optimiser and torch's RNG; its loop state."""
    state = load_checkpoint(path, device)
    if state["model_config"] != model_cfg.to_dict():
        raise ValueError(f"{path}: model config differs from the one asked for")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return LoopState(**{f.name: state[f.name] for f in fields(LoopState)})
