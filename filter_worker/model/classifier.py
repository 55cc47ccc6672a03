"""The model wrapper: load a sequence classifier, tokenize, run forward passes, return scores.

This is the only module that runs torch (``onnx_engine`` runs ONNX Runtime; ``onnx_export`` exports through it).
Tokenization and the forward pass are separate calls because the worker tokenizes on its Kafka thread
(to know lengths for batching) and runs forward passes on the inference thread. The forward pass is an
``Engine``: eager PyTorch here, or an ONNX Runtime session (``FILTER_MODEL__BACKEND=onnx``); both return
logits, and the rest of the classifier (tokenizer, padding, the head's score function and labels,
identity) is the same for both, so the two backends cannot disagree on what a score is.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from filter_worker.config import ConfigError, ModelSettings
from filter_worker.exit_codes import ModelLoadError
from filter_worker.logs import get_logger
from filter_worker.model import lockfile
from filter_worker.model.head import Head, labels_of
from filter_worker.pipeline.batching import plan_batches

log = get_logger(__name__)

# A token covers at least one character, so cutting far beyond max_length characters never changes
# the first max_length tokens in practice, and bounds the cost of a megabyte-long message.
_CHARS_PER_TOKEN_BOUND = 64


@dataclass(frozen=True, slots=True)
class Tokenized:
    ids: list[int]
    truncated: bool


def resolve_device(requested: str, backend: str = "torch") -> str:
    if backend == "onnx":
        from filter_worker.model import onnx_engine

        return onnx_engine.resolve_device(requested)
    if backend == "openvino":
        from filter_worker.model import openvino_engine

        return openvino_engine.resolve_device(requested)
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"FILTER_MODEL__DEVICE={requested} but no CUDA device is available")
    return requested


def resolve_dtype(requested: str, device: str, backend: str = "torch") -> str:
    """The precision to load for ``FILTER_MODEL__DTYPE`` on ``device``; refuses what the device cannot run well.

    - ``auto``: float16 on CUDA (tensor cores, half the memory traffic), float32 elsewhere: the choice
      without a measurement (one-off commands); ``run`` and ``bench`` measure (``model/precision.py``).
    - ``int8``: dynamic quantization of the Linear layers, which PyTorch implements for CPU only.
    - ``float16`` on CPU is refused: most CPUs have no float16 arithmetic, so it runs slower than
      float32, and bfloat16 gives the same memory saving with float32's range.

    The onnx backend has its own rules (``onnx_engine.resolve_dtype``): float32 and int8 graphs; so
    has openvino (``openvino_engine.resolve_dtype``): float32 and bfloat16.
    """
    if backend == "onnx":
        from filter_worker.model import onnx_engine

        return onnx_engine.resolve_dtype(requested, device)
    if backend == "openvino":
        from filter_worker.model import openvino_engine

        return openvino_engine.resolve_dtype(requested)
    setting = f"FILTER_MODEL__DTYPE={requested}"
    if requested == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if requested == "int8" and device != "cpu":
        raise ConfigError(
            f"{setting}: int8 (dynamic quantization) runs on CPU only; use float16 or bfloat16 on {device}"
        )
    if requested == "float16" and device == "cpu":
        raise ConfigError(
            f"{setting}: float16 on CPU is slower than float32 on most processors; use bfloat16 or int8 on CPU"
        )
    return requested


class Engine(Protocol):
    """What runs the forward pass: padded token ids and attention mask (int64, rows x width) in,
    logits (float32, rows x labels, the config's label order) out; the head turns them into scores.

    ``streams``: how many passes it runs at once, each called from a thread of its own.
    """

    streams: int

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


class TorchEngine:
    """Eager PyTorch: the model as transformers loads it (int8: dynamically quantized).

    One pass at a time: an eager pass takes the GIL back between its ops, so two at once contend for it.
    """

    streams = 1

    def __init__(self, module: Any, device: str) -> None:
        self.module = module
        self._device = device
        # Pinned host memory lets the copy to the GPU run asynchronously (non_blocking).
        self._pin = device.startswith("cuda")

    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        import torch

        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self._pin:  # from the caching host allocator, so pinning costs no allocation per batch
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        with torch.inference_mode():
            logits = self.module(
                input_ids=ids_t.to(self._device, non_blocking=self._pin),
                attention_mask=mask_t.to(self._device, non_blocking=self._pin),
            ).logits
            return logits.float().cpu().numpy()


def pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id rows padded to the longest one, and the attention mask that marks the real tokens.

    In numpy, not a loop per row: at a few hundred rows a pass the loop was a visible cost.
    """
    lengths = np.fromiter(map(len, batch), dtype=np.int64, count=len(batch))
    real = np.arange(int(lengths.max())) < lengths[:, np.newaxis]  # (rows, width): True where a token is
    ids = np.full(real.shape, pad_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum()))
    return ids, real.astype(np.int64)


def _engine(module: Any, backend: str, dtype: str, device: str, streams: int | str = 1) -> Engine:
    """The engine that runs a float32 (or, for torch, already ``dtype``) module at ``dtype``.

    ``streams`` (FILTER_MODEL__STREAMS) is for the openvino engine: the settings refuse more than one
    elsewhere, and ``auto`` is one stream on every other engine.
    """
    import torch

    if backend == "openvino":
        from filter_worker.model import openvino_engine

        return openvino_engine.OpenVinoEngine(module, dtype, torch.get_num_threads(), streams)
    floating = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    module = _quantize_dynamic(module) if dtype == "int8" else module.to(floating.get(dtype, torch.float32))
    return TorchEngine(module, device)


class Classifier:
    """A loaded classifier. Thread use: ``tokenize`` on one thread and ``predict`` on another is safe."""

    def __init__(
        self,
        tokenizer: Any,
        engine: Engine,
        head: Head,
        name: str,
        revision: str,
        device: str,
        max_length: int,
        weights_sha256: str,
        dtype: str,
        backend: str = "torch",
    ) -> None:
        self.tokenizer = tokenizer
        # A copy of the fast tokenizer's Rust backend that truncates to max_length by itself.
        backend_tokenizer = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
        backend_tokenizer.enable_truncation(max_length)
        backend_tokenizer.no_padding()
        # encode_batch_fast skips character offsets (tokenizers >= 0.21).
        self._encode = getattr(backend_tokenizer, "encode_batch_fast", backend_tokenizer.encode_batch)
        self.engine = engine
        self.head = head
        self.name = name
        self.revision = revision
        self.weights_sha256 = weights_sha256
        self.device = device
        self.max_length = max_length
        self.dtype = dtype
        self.backend = backend
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._one_pass = threading.Lock()

    @classmethod
    def load(cls, settings: ModelSettings) -> Classifier:
        """Load tokenizer and weights (safetensors only) from a local directory or the hub.

        A local directory is first checked against its lock file (``settings.verify``); a mismatch
        raises before any of its files is read by transformers. A locked directory reports the model id
        and commit it was pulled from, so headers and metrics name the real model, not a path.

        With ``FILTER_MODEL__BACKEND=onnx`` the weights are not loaded into PyTorch: the graph exported
        from them runs instead (``onnx_engine``), which needs a local directory to keep it in.
        """
        import transformers
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        # auto: torch (model/precision.py chooses)
        backend = settings.backend if settings.backend in ("onnx", "openvino") else "torch"
        onnx = backend == "onnx"
        device = resolve_device(settings.device, backend)
        dtype = resolve_dtype(settings.dtype, device, backend)
        local = Path(settings.name).is_dir()
        if onnx and not local:
            raise ModelLoadError(
                f"FILTER_MODEL__BACKEND=onnx needs a local model directory for its exported graph, not the hub id "
                f"'{settings.name}'; pull it first: filter-worker model pull {settings.name} --to DIR"
            )
        lock = _verified_lock(settings, local)
        if local:
            _check_complete(settings.name)
        kwargs: dict[str, object] = {"revision": settings.revision, "trust_remote_code": settings.trust_remote_code}
        if not local and not hub_reachable():
            # Without this, the hub client retries for most of a minute before failing; a model
            # already in the local cache still loads.
            kwargs["local_files_only"] = True
        try:
            tokenizer = AutoTokenizer.from_pretrained(settings.name, **kwargs)
            if onnx:
                model, config = None, AutoConfig.from_pretrained(settings.name, **kwargs)
            else:  # openvino converts the float32 module
                weights_dtype = "float32" if backend == "openvino" else dtype
                model = _load_weights(AutoModelForSequenceClassification, settings.name, weights_dtype, device, kwargs)
                config = model.config
        except (OSError, ValueError, SafetensorError) as exc:  # a corrupt weight file raises SafetensorError
            raise ModelLoadError(_load_failure(settings.name, local, exc)) from exc
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(f"model '{settings.name}' has no fast (Rust) tokenizer; tokenizer.json is required")
        positions = getattr(config, "max_position_embeddings", settings.max_length)
        max_length = min(settings.max_length, positions)
        if lock is not None:
            name, revision, weights = lock.model_id, lock.revision, lock.weights_sha256
        elif local:
            name, revision, weights = settings.name, "local", lockfile.directory_weights_sha256(settings.name)
        else:
            snapshot = _hub_snapshot(settings.name, settings.revision)
            commit = snapshot.name if snapshot is not None else getattr(config, "_commit_hash", None)
            if not lockfile.is_commit(settings.revision):
                log.warning(
                    "model revision is not pinned: set FILTER_MODEL__REVISION to a commit so every worker loads "
                    "the same weights",
                    model=settings.name,
                    requested=settings.revision or "main",
                    resolved=commit,
                )
            name, revision = settings.name, commit or settings.revision or "main"
            weights = lockfile.directory_weights_sha256(snapshot) if snapshot is not None else ""
        head = Head.of(config, settings)
        engine: Engine
        if model is None:
            from filter_worker.model import onnx_engine

            # A locked directory is never written to at load, also when its verification is turned off.
            locked = (Path(settings.name) / lockfile.LOCK_NAME).is_file()
            engine = onnx_engine.load_engine(Path(settings.name), dtype, device, weights, labels_of(config), locked)
        else:
            import torch

            model.to(device).eval()
            torch.set_grad_enabled(False)
            engine = _engine(model, backend, dtype, device, settings.streams)
        log.info(
            "model loaded",
            model=name,
            revision=revision,
            weights_sha256=weights,
            verified=lock is not None,
            source=settings.name,
            device=device,
            dtype=dtype,
            backend=backend,
            streams=engine.streams,
            labels=list(head.labels),
            score_function=head.describe(),
        )
        return cls(tokenizer, engine, head, name, revision, device, max_length, weights, dtype, backend)

    @property
    def labels(self) -> list[str]:
        """The head's labels in output order (``FILTER_MODEL__LABELS`` where set), as rules and outputs name them."""
        return list(self.head.labels)

    def at_precision(self, dtype: str, backend: str = "torch", streams: int = 1) -> Classifier:
        """This torch float32 classifier's weights at ``dtype`` (bfloat16, float16, int8), without reading them again.

        What the start-up precision check measures (``model/precision.py``): converting the loaded
        float32 module gives the same weights ``from_pretrained`` would at that dtype, in a fraction of
        a load's time, and needs no second tokenizer load. ``backend="openvino"`` converts the module
        for OpenVINO instead, as a load with that backend does, compiled for ``streams`` passes at once.
        """
        import copy

        if not isinstance(self.engine, TorchEngine) or self.dtype != "float32":
            raise ValueError(f"precisions are derived from a torch float32 classifier, not {self.backend} {self.dtype}")
        resolve_dtype(dtype, self.device, backend)
        # OpenVINO's conversion copies the weights itself; torch's conversions change the module in place.
        module = self.engine.module if backend == "openvino" else copy.deepcopy(self.engine.module)
        return Classifier(
            self.tokenizer,
            _engine(module, backend, dtype, self.device, streams),
            self.head,
            self.name,
            self.revision,
            self.device,
            self.max_length,
            self.weights_sha256,
            dtype,
            backend,
        )

    @property
    def identity(self) -> str:
        """``name@revision#sha256:<first 16 hex of weights_sha256>``: what the ``filter.model`` header carries.

        With ``FILTER_MODEL__SCORE_FUNCTION`` overriding the model's own function, ``+<function>`` follows:
        the same weights then give other scores, and verdicts and drift references must not mix the two.
        """
        suffix = f"#sha256:{self.weights_sha256[:16]}" if self.weights_sha256 else ""
        scores = f"+{self.head.function}" if self.head.overridden else ""
        return f"{self.name}@{self.revision}{suffix}{scores}"

    def tokenize(self, texts: Sequence[str]) -> list[Tokenized]:
        """Token ids per text, truncated to ``max_length``; ``truncated`` says whether text was cut.

        Straight through the Rust tokenizer (``encode_batch_fast``: no character offsets), which
        works on the whole batch with the GIL released; transformers' Python wrapper around it cost
        about twice as much per text (measured with a near-free model, where tokenizing was a third
        of the loop's time). A text is truncated when its tokens overflowed ``max_length`` or it was
        cut to the character bound first.
        """
        limit = self.max_length * _CHARS_PER_TOKEN_BOUND
        clipped = [t[:limit] for t in texts]
        encodings = self._encode(clipped, add_special_tokens=True)
        return [
            Tokenized(e.ids, len(original) > limit or bool(e.overflowing))
            for original, e in zip(texts, encodings, strict=True)
        ]

    @property
    def streams(self) -> int:
        """Forward passes the engine runs at once (FILTER_MODEL__STREAMS; 1 for torch and onnx)."""
        return self.engine.streams

    def predict(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass over token-id rows (padded here); returns scores, shape (rows, labels).

        Passes beyond the engine's streams wait for one to end: after a rule reload's fallback swaps a
        one-stream torch engine in (``Precision.recheck``), the worker's model threads, one per stream
        of the engine it started with, take turns instead of running eager passes on every thread at once.
        """
        ids, mask = pad(batch, self.pad_id)
        with self._one_pass if self.engine.streams == 1 else contextlib.nullcontext():
            return self.head.scores(self.engine.logits(ids, mask))

    def predict_many(self, batches: Sequence[Sequence[Sequence[int]]]) -> list[np.ndarray]:
        """``predict`` over every batch, ``streams`` passes at a time as the worker runs them; in order.

        What measures the engine (the start-up check, bench's ceiling) runs it this way: a multi-stream
        engine timed one pass at a time would run each on its share of the threads only.
        """
        if self.streams == 1:
            return [self.predict(batch) for batch in batches]
        with ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="predict") as pool:
            return list(pool.map(self.predict, batches))

    def classify(
        self, texts: Sequence[str], max_size: int = 32, max_tokens: int = 16_384
    ) -> tuple[np.ndarray, list[bool]]:
        """Scores for every text in input order, plus truncation flags; batched by length."""
        tokens = self.tokenize(texts)
        lengths = [len(t.ids) for t in tokens]
        probs = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        groups = plan_batches(lengths, max_size, max_tokens)
        for group, scores in zip(groups, self.predict_many([[tokens[i].ids for i in g] for g in groups]), strict=True):
            probs[group] = scores
        return probs, [t.truncated for t in tokens]


def _verified_lock(settings: ModelSettings, local: bool) -> lockfile.Lock | None:
    """The directory's lock once the files match it; None when verification is off or there is no lock."""
    if settings.verify is False:
        return None
    if not local:
        if settings.verify is True:
            raise ModelLoadError(
                f"FILTER_MODEL__VERIFY=true needs a local model directory with a lock file, not the hub id "
                f"'{settings.name}'; pull it first: filter-worker model pull {settings.name} --to DIR"
            )
        return None
    if settings.verify == "auto" and not (Path(settings.name) / lockfile.LOCK_NAME).is_file():
        return None
    try:
        lock = lockfile.read_lock(settings.name)
    except lockfile.LockError as exc:
        raise ModelLoadError(f"FILTER_MODEL__VERIFY: {exc}") from None
    problems = lockfile.verify_directory(settings.name, lock)
    if problems:
        raise ModelLoadError(
            f"model directory '{settings.name}' does not match its {lockfile.LOCK_NAME}: "
            + "; ".join(str(p) for p in problems)
            + ". Pull it again, or set FILTER_MODEL__VERIFY=false to load it anyway"
        )
    return lock


def _check_complete(directory: str) -> None:
    missing = lockfile.missing_model_files(directory)
    if missing == ["*.safetensors weights"] and any(Path(directory).glob("*.bin")):
        raise ModelLoadError(
            f"model directory '{directory}' has pickle weights but no safetensors; only safetensors are loaded "
            "(pickle files can run code)"
        )
    if missing:
        raise ModelLoadError(
            f"model directory '{directory}' has no {', no '.join(missing)}: it is not a complete model; write one with "
            f"{_FETCH_ADVICE}"
        )


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The cache folder the model was just loaded from; its name is the resolved commit."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(name, "config.json", revision=revision or "main")
    return Path(config).parent if isinstance(config, str) else None


def _load_weights(auto_cls: type, name: str, dtype: str, device: str, kwargs: dict[str, object]) -> Any:
    """from_pretrained in the floating-point dtype to run (int8 loads float32, then quantizes).

    On CUDA the attention is PyTorch's scaled_dot_product_attention (fused kernels); a model class
    without SDPA support loads with its own attention instead of failing.
    """
    import torch
    import transformers

    floating = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
    # transformers renamed torch_dtype to dtype in 4.56 and warns about the old name since.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    options = {**kwargs, "use_safetensors": True, dtype_kw: floating[dtype]}
    if device.startswith("cuda"):
        try:
            return auto_cls.from_pretrained(name, attn_implementation="sdpa", **options)  # type: ignore[attr-defined]
        except ValueError as exc:
            if "sdpa" not in str(exc).lower():
                raise
    return auto_cls.from_pretrained(name, **options)  # type: ignore[attr-defined]


def _quantize_dynamic(model: Any) -> Any:
    """int8 weights for every nn.Linear, activations quantized per batch at run time (CPU)."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    # torch.ao.quantization is deprecated in favour of torchao (a separate package) but still works
    # in the supported torch versions; the warnings would otherwise appear in every start-up log.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


# The project's own commands, so the advice works with whatever huggingface-hub version is installed
# (current ones no longer install huggingface-cli).
_FETCH_ADVICE = (
    "'filter-worker model pull NAME --to DIR' on a machine with hub access (then copy DIR here), "
    "or 'filter-worker model synth DIR' for an offline stand-in"
)


def _load_failure(name: str, local: bool, exc: Exception) -> str:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "safetensors" in str(exc).lower():
        return f"model '{name}' has no safetensors weights; only safetensors are loaded (pickle files can run code)"
    if local:
        return f"could not load the model in directory '{name}': {cause}"
    # "org/name" is also a relative path: say that no such directory is here either.
    nowhere = " (nor is there a directory of that name here)" if "/" in name else ""
    return (
        f"could not load model '{name}' from the Hugging Face Hub ({cause.rstrip('.')}){nowhere}; get a model "
        f"directory with {_FETCH_ADVICE}, and pass --model DIR (or set FILTER_MODEL__NAME=DIR)"
    )
