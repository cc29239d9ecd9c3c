from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, make_tokenizer

from costeer_sdk import InProcessRemote, LoadedModel, PersonalLLM


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def cloud_model(tokenizer) -> LoadedModel:
    return make_model(tokenizer, seed=1, hidden=48, layers=3, name="tiny-cloud")


@pytest.fixture(scope="session")
def local_model(tokenizer) -> LoadedModel:
    return make_model(tokenizer, seed=2, name="tiny-local")


@pytest.fixture(scope="session")
def model_dirs(tokenizer, tmp_path_factory) -> list[str]:  # type: ignore[no-untyped-def]
    """Two tiny models saved as model directories (cloud, local): for code that takes
    model specs, such as the examples and `costeer eval`."""
    dirs = []
    for seed, name in ((1, "cloud"), (2, "local")):
        out = tmp_path_factory.mktemp(name)
        loaded = make_model(tokenizer, seed=seed)
        loaded.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(str(out))
    return dirs


@pytest.fixture
def llm(cloud_model, local_model) -> PersonalLLM:
    return PersonalLLM(InProcessRemote(cloud_model, top_k=None), local_model)


HISTORY = [
    "I ran ten miles in my new shoes and they felt light and springy.",
    "The cushioning is soft, the grip is good on wet trails.",
    "My earlier pair wore out after five hundred miles.",
]
