"""Model specs resolve, and the converted-model cache is reused, verified and rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_model

from costeer_sdk import ConfigurationError, ModelNotFoundError
from costeer_sdk.engine import loading
from costeer_sdk.engine.loading import cached_conversion, load_model, resolve_dtype, verify_cache


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id must resolve from the local cache
    return tmp_path / "cache"


def save_tiny(tokenizer, out: Path) -> None:  # type: ignore[no-untyped-def]
    loaded = make_model(tokenizer, seed=11)
    loaded.model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def test_a_model_directory_loads(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_tiny(tokenizer, tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert model.vocab_size == len(tokenizer)
    assert model.fingerprint == make_model(tokenizer, seed=0).fingerprint


def test_conversion_is_cached_and_rebuilt_when_corrupted(tokenizer) -> None:  # type: ignore[no-untyped-def]
    builds: list[Path] = []

    def build(out: Path) -> None:
        builds.append(out)
        save_tiny(tokenizer, out)

    first = cached_conversion("tiny-test", build, source="test")
    assert len(builds) == 1 and verify_cache(first) is None
    again = cached_conversion("tiny-test", build, source="test")
    assert again == first and len(builds) == 1  # reused, not converted again

    weights = first / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the middle of the weights
    weights.write_bytes(bytes(data))
    assert verify_cache(first) == "model.safetensors does not match its checksum"
    rebuilt = cached_conversion("tiny-test", build, source="test")
    assert len(builds) == 2 and verify_cache(rebuilt) is None
    assert load_model(str(rebuilt)).vocab_size == len(tokenizer)

    (rebuilt / "config.json").unlink()
    assert verify_cache(rebuilt) == "config.json is missing or has the wrong size"
    cached_conversion("tiny-test", build, source="test")
    assert len(builds) == 3


def test_a_failed_build_leaves_no_cache_behind(isolated_cache: Path) -> None:
    def broken(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        cached_conversion("broken", broken, source="test")
    leftovers = [p for p in (isolated_cache / "converted").iterdir() if p.suffix != ".lock"]
    assert leftovers == []


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("builtin:no-such-model", "unknown builtin model"),
        ("/nonexistent/model.gguf", "no model at"),
        ("./missing-dir", "no model at"),
        ("nobody/no-such-model-on-this-machine", "could not load"),
    ],
)
def test_unresolvable_specs_raise_model_not_found(spec: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        load_model(spec)


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loading, "cpu_has_amx", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_amx", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16


def test_amx_detection_agrees_with_the_kernels_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    assert loading.cpu_has_amx() == ("amx_bf16" in cpuinfo.read_text())


@pytest.mark.parametrize("bad", ["int64", "float33", "Auto"])
def test_a_bad_dtype_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="dtype must be"):
        resolve_dtype(bad)


def test_models_load_in_the_auto_dtype_by_default(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_tiny(tokenizer, tmp_path / "m")
    weights = {p.dtype for p in load_model(str(tmp_path / "m")).model.parameters()}
    assert weights == {resolve_dtype("auto")}
    narrow = load_model(str(tmp_path / "m"), dtype="float32").model.parameters()
    assert {p.dtype for p in narrow} == {torch.float32}


def test_a_converted_gguf_directory_loads_as_the_plain_model_it_holds(  # type: ignore[no-untyped-def]
    tokenizer, tmp_path: Path
) -> None:
    """A conversion from GGUF holds dequantized weights, but transformers writes the GGUF
    quantization settings into its config; honoured, they attach a GGUF quantizer that
    warns of packed weights and slow casts that are not there."""
    save_tiny(tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gguf", "dequantize": False, "gguf_file": "tiny.gguf"
    }  # fmt: skip
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path / "m"), dtype="float32")
    assert getattr(model.model, "hf_quantizer", None) is None
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = make_model(tokenizer, seed=11).model(ids).logits
        torch.testing.assert_close(model.model(ids).logits, expected)


def test_progress_false_draws_no_progress_bars(  # type: ignore[no-untyped-def]
    tokenizer, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import transformers

    save_tiny(tokenizer, tmp_path / "m")
    capfd.readouterr()
    load_model(str(tmp_path / "m"), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()  # put back
    load_model(str(tmp_path / "m"))
    assert "Loading weights" in capfd.readouterr().err
