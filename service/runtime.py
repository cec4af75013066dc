"""onnxruntime sessions for a bundle's encoder and decoder graphs.

Numpy in, numpy out — except the caches with IO binding (below); the decoding logic lives in
``service.engine``. The execution provider is chosen here (``cpu | cuda | auto``) and logged,
and intra-op threads default to the cores this process may really use (CPU affinity and the
cgroup quota, not the host's count), shared out among the scheduler's decode lanes
(``plan_lanes``), which run the same sessions concurrently.

IO binding (``RuntimeConfig.io_binding``, on with CUDA): the decoder's present key/value outputs
are bound to device memory and fed back as the next step's past inputs without a trip through
host memory, and the cross-attention keys/values stay on the device and are reused every step.
Only the logits and the (small) cross-attention weights come back to the host each step. Cache
values are then ``Cache`` objects (``onnxruntime.OrtValue``) rather than numpy arrays. When the
batch's membership changes, ``cache_ops`` (``service.cacheops``, chosen once here:
``RuntimeConfig.cache_copies``) copies them: on CUDA with copy graphs on the device
(``service.devicecache``), so that the caches never pass through host memory, the encoder's
output included; elsewhere in host memory. On CPU both code paths run against host memory,
which is how the tests exercise them.

In-place KV cache (``RuntimeConfig.kv_cache``, used on CPU when the bundle carries
``decoder_kv.onnx``): every cache is one preallocated host buffer (capacity rows, H, M, Dh),
row b holding its own history at positions 0..position-1; the buffer is bound as both the past
input and the present output of onnxruntime's GroupQueryAttention, which writes the new
key/value in place. A step then costs the same whatever the ages of the rows it mixes, instead
of copying every row's whole history (left-padded to the oldest row) into a new present tensor.
CUDA keeps the ``decoder.onnx`` path: onnxruntime implements that operator for fp16 only there.

Packed encoding (``RuntimeConfig.packing``, ``auto`` where the bundle carries
``encoder_packed.onnx``): a group of sentences is encoded as one row of their real tokens end to
end, each token attending within its own sentence, instead of a batch padded to the longest.
``service.engine`` picks the cheaper layout for every encoder run (``auto``) or always packs
(``always``); ``off`` never loads the graph.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError, graph_io, sha256_bytes
from service.cacheops import HOST, Cache, CacheOps, host_array, on_device, to_host
from service.settings import check, setting

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
    provider: str = setting(
        "auto",
        "execution provider: cpu, cuda, or auto (CUDA where onnxruntime-gpu sees a GPU)",
        choices=("cpu", "cuda", "auto"),
    )
    precision: str = setting(
        "fp32", "graphs to serve: fp32, or int8 if the bundle has them", choices=("fp32", "int8")
    )
    threads: int = setting(
        0,
        "onnxruntime intra-op threads of each decode lane (0: the cores this process may use, "
        "shared out among the lanes)",
        0,
        1024,
    )
    # Internal settings (no flags: the right value follows from the provider and the bundle;
    # tests and benchmarks set them to compare or to force a path).
    # Let the decoder's idle intra-op threads spin between steps instead of sleeping: offline
    # decoding, where nothing else wants the cores, steps faster (no wake-up per kernel); a
    # server's gRPC loop would lose its core to them. The encoders' threads never spin: their
    # pools idle through every decoder step, and spinning there only takes cores away.
    spin: bool = False
    # The decoder session's intra-op threads: 0 follows decoder_threads() (one for a small
    # model); benchmarks set it to measure that choice.
    decoder_threads: int = 0
    arena: bool = False  # onnxruntime's CPU memory arena (keeps a high-water mark per shape mix)
    io_binding: str = setting("auto", choices=("on", "off", "auto"))  # auto: on with CUDA
    kv_cache: str = setting("auto", choices=("inplace", "concat", "auto"))  # see the docstring
    # auto: device with CUDA (needs IO binding; see the docstring)
    cache_copies: str = setting("auto", choices=("host", "device", "auto"))
    packing: str = setting("auto", choices=("auto", "always", "off"))  # see the docstring

    def __post_init__(self) -> None:
        check(self)


MAX_AUTO_LANES = 4

# A decoder step of a model this small (multiply-adds per row and step) runs on one intra-op
# thread whatever the lane's budget: its kernels are so short that waking a second thread for
# each costs more than the half of the work it takes over. Measured on this project's 2-core
# machine (benchmarks/RESULTS.md, issue 18, three rounds): the default model (0.5 M per row)
# steps 1.3x faster on one thread than on two at batches of 1, 8 and 32 rows (spinning, two
# threads buy at most 4 %); marian-small (4.8 M) steps up to 1.3x faster on two at batches of 8
# and 32 (1.7x spinning), so it keeps the budget.
ONE_THREAD_STEP_MACS = 2_000_000


def step_macs(model: dict[str, Any], vocab: int) -> int:
    """A decoder step's multiply-adds per row: per layer the self-attention's four projections,
    the cross-attention's query and output (its keys and values come from the encoder) and the
    feed-forward; then the output layer."""
    d, ff = int(model["d_model"]), int(model["d_ff"])
    return int(model["n_decoder_layers"]) * (6 * d * d + 2 * d * ff) + d * vocab


def decoder_threads(threads: int, model: dict[str, Any], vocab: int, provider: str) -> int:
    """The decoder session's intra-op threads: the lane's, or one for a small model on the
    CPU (see ONE_THREAD_STEP_MACS)."""
    small = provider == CPU and step_macs(model, vocab) < ONE_THREAD_STEP_MACS
    return 1 if small else threads


def plan_lanes(lanes: int, cfg: RuntimeConfig) -> tuple[int, RuntimeConfig]:
    """Decode lanes (batches decoded in parallel, see ``service.scheduler``) and the runtime
    config with intra-op threads per lane resolved. lanes 0 (auto): one per usable core up to
    MAX_AUTO_LANES on CPU, one on CUDA; threads 0: the usable cores shared out among the lanes.

    Why lanes by default on CPU: at these models' sizes a second intra-op thread adds little
    (measured on 2 cores, batches of up to 64: d128 3716 → 3693 sentences/s with 1 thread
    instead of 2, d256 358 → 330, d512 87 → 60), while two batches decoded side by side with
    one thread each reach 1.8x, 1.9x and 1.3x one batch with two threads."""
    if lanes < 0:
        raise ValueError("lanes must be ≥ 0")
    cores = usable_cores()
    if lanes == 0:
        lanes = 1 if providers_for(cfg.provider)[0] == CUDA else min(cores, MAX_AUTO_LANES)
    threads = cfg.threads or max(1, cores // lanes)
    return lanes, replace(cfg, threads=threads)


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


def session_options(cfg: RuntimeConfig, threads: int, spin: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # Batch shapes change every step; the CPU arena would keep growing to the largest mix
    # seen (measured: +9% RSS over a 10-minute soak) for no speed gain on these graphs.
    opts.enable_cpu_mem_arena = cfg.arena
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Unless asked (RuntimeConfig.spin), idle intra-op threads do not spin for a while after
    # every run, which would take the cores the gRPC event loop needs between decoder steps.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


def check_io(bundle: Bundle, precision: str, part: str, session: ort.InferenceSession) -> None:
    """The graph has the input and output names that manifest.json records for its part, and
    those are the contract's (``GraphIO``, by which the runtime feeds and reads it, never by
    position): else BundleError naming the file and the difference."""
    recorded = bundle.io(part)
    contract = graph_io(int(bundle.model["n_decoder_layers"])).manifest()[part]
    actual = {
        "inputs": [i.name for i in session.get_inputs()],
        "outputs": [o.name for o in session.get_outputs()],
    }
    name = bundle.graph(precision, part).name
    problems = []
    for kind in ("inputs", "outputs"):
        for have, want, what in (
            (actual, recorded, f"{name}: its {kind} differ from manifest.json's onnx.io.{part}"),
            (recorded, contract, f"manifest.json: onnx.io.{part}.{kind} are not the contract's"),
        ):
            missing = [n for n in want[kind] if n not in have[kind]]
            extra = [n for n in have[kind] if n not in want[kind]]
            if missing or extra:
                problems.append(f"{what}: missing {missing}, not expected {extra}")
    if problems:
        raise BundleError(bundle.directory, problems)


def choose_graphs(bundle: Bundle, cfg: RuntimeConfig, provider: str) -> tuple[str, bool]:
    """The encoder packing in use ("off" where the bundle has no packed encoder) and whether
    the decoder is decoder_kv (in-place caches: on the CPU, where the bundle has it)."""
    has_packed = bundle.has_graph(cfg.precision, "encoder_packed")
    if cfg.packing == "always" and not has_packed:
        raise RuntimeError(
            f"packing 'always': the bundle has no {cfg.precision} encoder_packed graph "
            "(re-export it with this version of `python -m export export`)"
        )
    has_kv = bundle.has_graph(cfg.precision, "decoder_kv")
    if cfg.kv_cache == "inplace" and not has_kv:
        raise RuntimeError(
            f"kv_cache 'inplace': the bundle has no {cfg.precision} decoder_kv graph "
            "(re-export it with this version of `python -m export export`)"
        )
    if cfg.precision == "int8" and provider == CUDA:
        raise RuntimeError(
            "int8 graphs with the CUDA provider: onnxruntime's CUDA provider has no kernels for "
            "their quantized MatMuls, which would run on the CPU, copying every step's "
            "activations through host memory; serve the fp32 graphs on CUDA (--precision fp32)"
        )
    if cfg.kv_cache == "inplace" and provider == CUDA:
        raise RuntimeError(
            "kv_cache 'inplace' runs on the CPU provider only (onnxruntime's CUDA "
            "GroupQueryAttention is fp16-only)"
        )
    packing = cfg.packing if has_packed else "off"
    return packing, has_kv and provider != CUDA and cfg.kv_cache != "concat"


def open_session(
    bundle: Bundle, precision: str, part: str, opts: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """A graph's session, its input and output names checked (they are fed and read by name:
    the contract's GraphIO, which the manifest records)."""
    path = bundle.graph(precision, part)
    name = bundle.manifest["onnx"]["graphs"][precision][part]
    # From its bytes, not its path: onnxruntime then cannot follow the graph to external data
    # files that the manifest does not list and no checksum covers.
    data = path.read_bytes()
    if sha256_bytes(data) != bundle.sha256(name):  # changed since it was checked
        raise BundleError(bundle.directory, [f"{name}: sha256 does not match"])
    try:
        session = ort.InferenceSession(data, opts, providers=providers)
    except Exception as e:  # onnxruntime's own errors are no RuntimeError subclass
        why = f"{name}: onnxruntime cannot load it ({type(e).__name__}: {e})"
        raise BundleError(bundle.directory, [why]) from e
    check_io(bundle, precision, part, session)
    return session


def choose_cache_ops(
    cfg: RuntimeConfig,
    device: str,
    io_binding: bool,
    providers: list[str],
    opts: ort.SessionOptions,
) -> CacheOps:
    """Where the batch's cache copies run: on the device with CUDA where IO binding keeps the
    caches there (or when forced, as the tests do on CPU); else in host memory."""
    auto = cfg.cache_copies == "auto"
    if cfg.cache_copies == "host" or (auto and not (device == "cuda" and io_binding)):
        return HOST
    if not io_binding:
        raise RuntimeError(
            "cache_copies 'device' keeps the caches in device memory, which needs IO binding "
            "(the concat decoder, io_binding 'on', or 'auto' with CUDA)"
        )
    try:  # onnx builds the copy graphs: the cuda extra, which the CPU image does not carry
        from service.devicecache import DeviceCacheOps
    except ImportError as e:
        raise RuntimeError(
            f"device-side cache copies need the onnx package ({e}): "
            "pip install 'nmtserve[cuda]' beside onnxruntime-gpu"
        ) from e
    return DeviceCacheOps(providers, device, opts)


class Runtime:
    """The encoder and decoder sessions of one bundle, one precision."""

    def __init__(self, bundle: Bundle, cfg: RuntimeConfig | None = None) -> None:
        cfg = cfg or RuntimeConfig()
        self.bundle = bundle
        self.cfg = cfg
        model = bundle.model
        self.n_layers = int(model["n_decoder_layers"])
        self.n_heads = int(model["n_heads"])
        self.d_model = int(model["d_model"])
        self.head_dim = int(model["d_model"]) // self.n_heads
        self.vocab_size = bundle.target_vocab_size
        # Every row starts from the decoder start token (bos for our own models; pad for
        # Marian's); the suppressed ids (Marian's pad) are never generated.
        self.bos_id = bundle.decoder_start_id
        self.suppressed = np.array(bundle.suppressed_ids, np.int64)
        self.eos_id = int(model["eos_id"])
        self.pad_id = int(model["pad_id"])
        self.threads = cfg.threads or usable_cores()
        opts = session_options(cfg, self.threads)
        providers = providers_for(cfg.provider)

        def open_graph(part: str, options: ort.SessionOptions = opts) -> ort.InferenceSession:
            return open_session(bundle, cfg.precision, part, options, providers)

        self.encoder = open_graph("encoder")
        self.provider = self.encoder.get_providers()[0]
        self.packing, self.inplace = choose_graphs(bundle, cfg, self.provider)
        self.packed_encoder = open_graph("encoder_packed") if self.packing != "off" else None
        self.decoder_threads = cfg.decoder_threads or decoder_threads(
            self.threads, model, self.vocab_size, self.provider
        )
        self.decoder = open_graph(
            "decoder_kv" if self.inplace else "decoder", self.decoder_options()
        )
        self.provider = self.decoder.get_providers()[0]
        if cfg.provider == "cuda" and self.provider != CUDA:
            raise RuntimeError("--provider cuda: onnxruntime could not start CUDA on this machine")
        io = graph_io(self.n_layers)
        self.past_names, self.cross_names, self.present_names = io.past, io.cross, io.present
        self.encoder_kv_names = io.encoder_kv
        self.decoder_outputs = io.decoder_outputs  # logits, present K/V, cross attention
        self.attention_names = io.cross_attentions
        self.device = "cuda" if self.provider == CUDA else "cpu"
        self.io_binding = not self.inplace and (
            cfg.io_binding == "on" or (cfg.io_binding == "auto" and self.provider == CUDA)
        )
        self.cache_ops = choose_cache_ops(cfg, self.device, self.io_binding, providers, opts)
        # Cache rows hold positions 0..limit-1 (the last step writes position limit-1).
        self.cache_length = bundle.limits.max_target_tokens + 1
        log.info("%s", self.describe())

    def decoder_options(self) -> ort.SessionOptions:
        """The decoder session's options: its own thread count (decoder_threads), spinning
        where RuntimeConfig.spin asks for it."""
        return session_options(self.cfg, self.decoder_threads, spin=self.cfg.spin)

    def describe(self) -> str:
        """The settings in use, for the start-up log line."""
        if self.inplace:
            cache = f"in place (preallocated, {self.cache_length} positions per row)"
        elif self.io_binding:
            cache = (
                f"concatenated, kept in {self.device} memory (IO binding), "
                f"copied on admission and compaction in {self.cache_ops.where} memory"
            )
        else:
            cache = "concatenated"
        packing = {"auto": "packed where cheaper than padded", "always": "packed", "off": "padded"}
        on_one = ""
        if self.decoder_threads < self.threads:
            on_one = (
                f" (the decoder's: {self.decoder_threads}, a step this small gains nothing "
                "from more)"
            )
        # each session's providers in priority order: nodes the first cannot run fall back
        sessions = {
            "encoder": self.encoder,
            "encoder_packed": self.packed_encoder,
            "decoder_kv" if self.inplace else "decoder": self.decoder,
        }
        graphs = ", ".join(
            f"{part} on {'+'.join(s.get_providers())}" for part, s in sessions.items() if s
        )
        return (
            f"execution provider {self.provider} ({graphs}), {self.cfg.precision} graphs, "
            f"{self.threads} intra-op threads{on_one}, KV cache {cache}, "
            f"encoder {packing[self.packing]}"
        )

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> list[Cache]:
        """ids, mask (B, S) int64 → cross K/V of every decoder layer, 2L × (B, H, S, Dh),
        where cache_ops keeps caches (device memory with device copies)."""
        feeds = {"input_ids": ids, "attention_mask": mask}
        return self.cache_ops.run(self.encoder, self.encoder_kv_names, feeds)

    def warm_up(self) -> None:
        """Runs each encoder graph once (the decoder runs in the first real decode)."""
        ids = np.array([[self.bos_id, self.eos_id]], np.int64)
        self.encode(ids, np.ones_like(ids))
        if self.packed_encoder is not None:
            self.encode_packed(ids[0], np.array([0, 0]), np.array([0, 1]))

    def encode_packed(
        self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray
    ) -> list[Cache]:
        """Sentences end to end: tokens, positions (in each sentence), segments (sentence
        index), each (T,) int64 → cross K/V of every decoder layer, 2L × (1, H, T, Dh), where
        cache_ops keeps caches (``CacheOps.unpack`` lays them out as a batch)."""
        assert self.packed_encoder is not None
        feeds = {
            "input_ids": tokens[None],
            "position_ids": positions[None],
            "segment_ids": segments[None],
        }
        return self.cache_ops.run(self.packed_encoder, self.encoder_kv_names, feeds)

    def step(
        self,
        tokens: np.ndarray,  # (B,) int64
        positions: np.ndarray,  # (B,) int64
        self_mask: np.ndarray,  # (B, P+1) int64
        src_mask: np.ndarray,  # (B, S) int64
        past: list[Cache],  # 2L × (B, H, P, Dh)
        cross: list[Cache],  # 2L × (B, H, S, Dh)
    ) -> tuple[np.ndarray, list[Cache], list[np.ndarray], list[Cache]]:
        """One decoder step → logits (B, V), present 2L × (B, H, P+1, Dh), cross attention
        L × (B, H, S), and the cross keys/values as the step used them (on the device with IO
        binding: keep them for the next step)."""
        if self.io_binding:
            return self._bound_step(tokens, positions, self_mask, src_mask, past, cross)
        feeds = {
            "input_ids": tokens[:, None],
            "position_ids": positions[:, None],
            "decoder_attention_mask": self_mask,
            "encoder_attention_mask": src_mask,
            **dict(zip(self.past_names, to_host(past), strict=True)),
            **dict(zip(self.cross_names, to_host(cross), strict=True)),
        }
        outs = self.decoder.run(self.decoder_outputs, feeds)
        n = 2 * self.n_layers
        return self.suppress(outs[0][:, 0, :]), list(outs[1 : 1 + n]), list(outs[1 + n :]), cross

    def suppress(self, logits: np.ndarray) -> np.ndarray:
        """logits (B, V) with the ids that are never generated at -inf (transformers'
        bad_words_ids for single tokens: the argmax and the scores both skip them)."""
        if self.suppressed.size:
            logits[:, self.suppressed] = -np.inf
        return logits

    def _on_device(self, v: Cache) -> ort.OrtValue:
        return on_device(v, self.device)

    def _bound_step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        self_mask: np.ndarray,
        src_mask: np.ndarray,
        past: list[Cache],
        cross: list[Cache],
    ) -> tuple[np.ndarray, list[Cache], list[np.ndarray], list[Cache]]:
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens[:, None]))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None]))
        binding.bind_cpu_input("decoder_attention_mask", np.ascontiguousarray(self_mask))
        binding.bind_cpu_input("encoder_attention_mask", np.ascontiguousarray(src_mask))
        cross_dev = [self._on_device(c) for c in cross]
        for name, v in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, self._on_device(v))
        for name, v in zip(self.cross_names, cross_dev, strict=True):
            binding.bind_ortvalue_input(name, v)
        n = 2 * self.n_layers
        logits = self._bind_logits(binding, len(tokens))
        for name in self.decoder_outputs[1:]:
            # the new cache stays put; the (small) attention weights come to the host
            binding.bind_output(name, self.device if name in self.present_names else "cpu", 0)
        self.decoder.run_with_iobinding(binding)
        outs = binding.get_outputs()
        attention = [host_array(o) for o in outs[1 + n :]]
        return self.suppress(logits), list(outs[1 : 1 + n]), attention, cross_dev

    def _bind_logits(self, binding: ort.IOBinding, rows: int) -> np.ndarray:
        """Binds the logits output to a new host array: onnxruntime writes (or copies from the
        device) straight into it, the step's one copy of (B, V) floats, instead of into memory
        of its own that would then be copied again. Returns the (B, V) view, suppressed ids
        masked after the run (see ``suppress``)."""
        buf = np.empty((rows, 1, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        return buf[:, 0, :]

    def cache_buffers(self, capacity: int, length: int) -> list[np.ndarray]:
        """2L zeroed buffers (capacity, H, length, Dh) for the in-place decoder."""
        shape = (capacity, self.n_heads, length, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]

    def step_inplace(
        self,
        tokens: np.ndarray,  # (B,) int64
        positions: np.ndarray,  # (B,) int64: also each row's cached length
        src_mask: np.ndarray,  # (B, S) int64
        buffers: list[np.ndarray],  # 2L × (capacity ≥ B, H, M, Dh), rows 0..B-1 updated
        cross: list[Cache],  # 2L × (B, H, S, Dh)
        binding: InPlaceStep | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step of decoder_kv.onnx → logits (B, V) and cross attention L × (B, H, S); the
        new keys/values are written into `buffers` at each row's position. With the batch's
        `binding` (see InPlaceStep) the outputs are its buffers, valid until its next step."""
        return (binding or InPlaceStep(self)).run(tokens, positions, src_mask, buffers, cross)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_heads, 0, self.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.n_layers)]


class InPlaceStep:
    """A batch's binding of decoder_kv.onnx, kept from one step to the next.

    Binding the graph's inputs and outputs (an IOBinding, an OrtValue per cache, cross
    key/value and output) costs CPU comparable to a small model's whole run, and onnxruntime
    runs a fresh binding more slowly (benchmarks/step_profile.py). A step whose arrays are the
    ones bound last time (the same cache buffers, cross keys/values and source mask objects,
    the same rows) only copies its tokens and positions into the bound input buffers and runs.
    Everything is bound by address, so what the batch changes in place (a newcomer placed in a
    free slot) is seen; a new array (the batch grown, filtered or its source widened) is bound
    afresh. The logits and cross-attention arrays a step returns are this object's buffers,
    which the next step overwrites. One batch, one thread: batches do not share it."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.binding: ort.IOBinding | None = None
        self.key: tuple[int, ...] = ()
        self.bound: tuple[np.ndarray, ...] = ()  # holds what is bound (its ids stay its own)

    def run(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        src_mask: np.ndarray,
        buffers: list[np.ndarray],
        cross: list[Cache],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Runtime.step_inplace's step."""
        key = (int(tokens.shape[0]), id(src_mask), *map(id, buffers), *map(id, cross))
        if self.binding is None or key != self.key:
            self._bind(key, src_mask, buffers, cross)
        assert self.binding is not None
        self.tokens[:, 0] = tokens
        self.positions[:, 0] = positions
        self.rt.decoder.run_with_iobinding(self.binding)
        return self.rt.suppress(self.logits[:, 0, :]), self.attention

    def _bind(
        self, key: tuple[int, ...], src_mask: np.ndarray, buffers: list[np.ndarray],
        cross: list[Cache],
    ) -> None:  # fmt: skip
        rt, b = self.rt, key[0]
        binding = rt.decoder.io_binding()
        mask = np.ascontiguousarray(src_mask)
        host = [np.ascontiguousarray(c) for c in to_host(cross)]
        self.tokens, self.positions = np.zeros((b, 1), np.int64), np.zeros((b, 1), np.int64)
        self.logits = np.empty((b, 1, rt.vocab_size), np.float32)
        self.attention = [
            np.empty((b, rt.n_heads, mask.shape[1]), np.float32) for _ in range(rt.n_layers)
        ]
        inputs = {
            "input_ids": self.tokens,
            "position_ids": self.positions,
            "encoder_attention_mask": mask,
            **dict(zip(rt.cross_names, host, strict=True)),
        }
        outputs = {
            "logits": self.logits,
            **dict(zip(rt.attention_names, self.attention, strict=True)),
        }
        for past, present, buf in zip(rt.past_names, rt.present_names, buffers, strict=True):
            inputs[past] = outputs[present] = buf[:b]  # C-contiguous rows of a C-contiguous buffer
        for name, arr in inputs.items():
            binding.bind_input(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        for name, arr in outputs.items():
            binding.bind_output(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)
        self.binding = binding
        self.bound = (mask, *buffers, *host)
        # Reused next step only if what was bound is what the batch holds (no copy was made).
        same = mask is src_mask and all(h is c for h, c in zip(host, cross, strict=True))
        self.key = key if same else ()
