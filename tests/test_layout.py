"""The package's shape: a network remote imports no engine, a missing extra is one clear
error, the library prints nothing unless the app configures logging."""

from __future__ import annotations

import subprocess
import sys

import pytest


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize(
    "module", ["costeer_sdk.remotes.session_http", "costeer_sdk.remotes.openai"]
)
def test_a_network_remote_imports_no_engine_server_or_extra(module: str) -> None:
    done = python(
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules if m.startswith(('costeer_sdk.engine',"
        " 'costeer_sdk.server', 'costeer_sdk.client', 'fastapi', 'uvicorn', 'gguf',"
        " 'transformers'))))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_root_names_load_on_first_use() -> None:
    done = python(
        "import sys, costeer_sdk\n"
        "assert 'costeer_sdk.engine.batcher' not in sys.modules\n"
        "assert costeer_sdk.SessionRemote.__module__ == 'costeer_sdk.remotes.session_http'\n"
        "assert costeer_sdk.PersonalLLM.__module__ == 'costeer_sdk.client'\n"
        "assert 'costeer_sdk.engine.batcher' in sys.modules\n"
        "assert set(costeer_sdk.__all__) <= set(dir(costeer_sdk))\n"
        "for name in costeer_sdk.__all__: getattr(costeer_sdk, name)\n"
        "assert not hasattr(costeer_sdk, 'fuse_iterative')"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        ("fastapi", "import costeer_sdk.server.app", "serve"),
        (
            "gguf",
            "from costeer_sdk.engine.loading import _convert_gguf as c; c(None, None)",
            "builtin",
        ),
        ("rouge_score", "from costeer_sdk.evaluation.metrics import _rouge as r; r()", "eval"),
    ],
)
def test_a_missing_extra_is_named(blocked: str, code: str, extra: str) -> None:
    done = python(
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from costeer_sdk.extras import MissingExtraError\n"
        f"try:\n    {code}\nexcept MissingExtraError as exc:\n    print(exc)"
    )
    assert done.returncode == 0, done.stderr
    assert f"pip install 'costeer-sdk[{extra}]'" in done.stdout


def test_library_warnings_print_nothing_unless_logging_is_configured() -> None:
    code = (
        "from costeer_sdk.logs import get_logger\n"
        "get_logger('costeer_sdk.client').warning('generate.interrupted', tokens=3)\n"
    )
    assert python(code).stderr == ""
    configured = python("import logging; logging.basicConfig()\n" + code)
    assert "generate.interrupted" in configured.stderr


def test_the_cli_names_a_missing_extra_in_one_line() -> None:
    done = python(
        "import sys; sys.modules['fastapi'] = None\n"
        "from costeer_sdk.cli import main\n"
        "main(['serve', '--model', 'x'])"
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "pip install 'costeer-sdk[serve]'" in done.stderr


def test_one_top_k_default_everywhere() -> None:
    import inspect

    from costeer_sdk import InProcessRemote, OpenAICompatibleRemote, PersonalLLM, SessionRemote
    from costeer_sdk.evaluation.runner import Evaluator
    from costeer_sdk.remotes.base import DEFAULT_TOP_K

    for where in (
        InProcessRemote.__init__,
        SessionRemote.__init__,
        OpenAICompatibleRemote.__init__,
        PersonalLLM.from_models,
        Evaluator.__init__,
    ):
        assert inspect.signature(where).parameters["top_k"].default == DEFAULT_TOP_K, where
    assert DEFAULT_TOP_K == 20


def test_the_constructor_keeps_bench_switches_private() -> None:
    import inspect

    from costeer_sdk import PersonalLLM

    assert "pipelined" not in inspect.signature(PersonalLLM.__init__).parameters


async def test_a_remote_passed_in_stays_open(cloud_model, local_model) -> None:  # type: ignore[no-untyped-def]
    from costeer_sdk import InProcessRemote, PersonalLLM, SessionRemote

    remote = SessionRemote("http://127.0.0.1:9")  # never called: describe is not reached
    llm = PersonalLLM(remote, local_model)
    await llm.aclose()
    assert not remote._client.is_closed  # the caller's to close
    await remote.aclose()
    assert remote._client.is_closed

    class Owned(InProcessRemote):
        closed = False

        async def aclose(self) -> None:
            self.closed = True

    built = PersonalLLM(Owned(cloud_model), local_model)
    built._owns_remote = True  # as from_models marks the remote it creates
    await built.aclose()
    assert built.remote.closed  # type: ignore[attr-defined]
