"""onnxruntime sessions for a bundle's encoder and decoder graphs.

Plain numpy in, numpy out; the decoding logic lives in ``service.engine``. The execution
provider is chosen here (``cpu | cuda | auto``) and logged, and intra-op threads default to the
cores this process may really use (CPU affinity and the cgroup quota, not the host's count).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle

log = logging.getLogger("nmtserve.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota() -> int | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return max(1, math.ceil(int(text[0]) / int(text[1])))
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v1
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(q / p)) if q > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RuntimeConfig:
    provider: str = "auto"  # cpu | cuda | auto
    precision: str = "fp32"  # fp32 | int8 (the bundle must carry it)
    threads: int = 0  # intra-op threads; 0: usable_cores()
    spin: bool = False  # let idle onnxruntime threads spin (faster offline, worse when serving)
    arena: bool = False  # onnxruntime's CPU memory arena (keeps a high-water mark per shape mix)

    def __post_init__(self) -> None:
        if self.provider not in ("cpu", "cuda", "auto"):
            raise ValueError(f"provider must be cpu, cuda or auto, not {self.provider!r}")
        if self.threads < 0:
            raise ValueError("threads must be ≥ 0")


def providers_for(choice: str) -> list[str]:
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                "--provider cuda: this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


class Runtime:
    """The encoder and decoder sessions of one bundle, one precision."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig | None = None) -> None:
        cfg = cfg or RuntimeConfig()
        self.bundle = bundle
        self.cfg = cfg
        model = bundle.model
        self.n_layers = int(model["n_decoder_layers"])
        self.n_heads = int(model["n_heads"])
        self.head_dim = int(model["d_model"]) // self.n_heads
        self.vocab_size = int(model["vocab_size"])
        self.bos_id = int(model["bos_id"])
        self.eos_id = int(model["eos_id"])
        self.pad_id = int(model["pad_id"])
        self.threads = cfg.threads or usable_cores()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        # Batch shapes change every step; the CPU arena would keep growing to the largest mix
        # seen (measured: +9% RSS over a 10-minute soak) for no speed gain on these graphs.
        opts.enable_cpu_mem_arena = cfg.arena
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not cfg.spin:
            # Idle intra-op threads would spin for a while after every run, taking the cores
            # the gRPC event loop needs between decoder steps.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers_for(cfg.provider)
        self.encoder = ort.InferenceSession(
            str(bundle.graph(cfg.precision, "encoder")), opts, providers=providers
        )
        self.decoder = ort.InferenceSession(
            str(bundle.graph(cfg.precision, "decoder")), opts, providers=providers
        )
        self.provider = self.decoder.get_providers()[0]
        if cfg.provider == "cuda" and self.provider != CUDA:
            raise RuntimeError("--provider cuda: onnxruntime could not start CUDA on this machine")
        self.decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        self.past_names = self.decoder_inputs[4 : 4 + 2 * self.n_layers]
        self.cross_names = self.decoder_inputs[4 + 2 * self.n_layers :]
        log.info(
            "execution provider %s, %s graphs, %d intra-op threads",
            self.provider,
            cfg.precision,
            self.threads,
        )

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
        """ids, mask (B, S) int64 → cross K/V of every decoder layer, 2L arrays (B, H, S, Dh)."""
        outs = self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})
        return list(outs[1:])

    def step(
        self,
        tokens: np.ndarray,  # (B,) int64
        positions: np.ndarray,  # (B,) int64
        self_mask: np.ndarray,  # (B, P+1) int64
        src_mask: np.ndarray,  # (B, S) int64
        past: list[np.ndarray],  # 2L × (B, H, P, Dh)
        cross: list[np.ndarray],  # 2L × (B, H, S, Dh)
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One decoder step → logits (B, V), present 2L × (B, H, P+1, Dh), cross attention
        L × (B, H, S)."""
        feeds = {
            "input_ids": tokens[:, None],
            "position_ids": positions[:, None],
            "decoder_attention_mask": self_mask,
            "encoder_attention_mask": src_mask,
            **dict(zip(self.past_names, past, strict=True)),
            **dict(zip(self.cross_names, cross, strict=True)),
        }
        outs = self.decoder.run(None, feeds)
        n = 2 * self.n_layers
        return outs[0][:, 0, :], list(outs[1 : 1 + n]), list(outs[1 + n :])

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]
