"""What a client needs to steer a cloud whose tokens are not the device's.

`CloudSide` is decided once per client, from the remote's `RemoteInfo`: a cloud that
keys log-probs by text, or one whose tokenizer differs from the device's (known from an
`InProcessRemote`, or given as ``cloud_tokenizer``). `Crossing` is one generation's
share: the cloud's prompt, the device's text and the output ids' table.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from costeer_sdk.alignment.aligner import Aligner, AlignmentMethod
from costeer_sdk.alignment.device_text import DeviceText
from costeer_sdk.alignment.loop import PieceTable
from costeer_sdk.alignment.vocabulary import Vocabulary
from costeer_sdk.context import Prompt, PromptBuilder
from costeer_sdk.engine.runtime import LoadedModel, tokenizer_eos_ids

__all__ = ["CloudSide", "Crossing"]


@dataclass(frozen=True)
class CloudSide:
    """A cloud across tokenizers, as the client sees it.

    Attributes:
        tokenizer: the cloud's tokenizer; None for a text-keyed cloud, whose prompt is
            then laid out in the device's chat format unless ``prompts`` says otherwise.
        eos_ids: the cloud's end-of-turn ids (id-keyed clouds).
        prompts: builds the cloud's public prompt in the cloud's chat format.
        aligner: scores the cloud's candidates on the device.
    """

    tokenizer: PreTrainedTokenizerBase | None
    eos_ids: frozenset[int]
    prompts: PromptBuilder
    aligner: Aligner

    @classmethod
    def build(
        cls,
        device: LoadedModel,
        cloud_tokenizer: PreTrainedTokenizerBase | None,
        method: AlignmentMethod,
        *,
        text_keys: bool,
        cloud_width: int = 0,
        system_prompt: str | None = None,
    ) -> CloudSide:
        device_vocabulary = _vocabulary(device)
        template = cloud_tokenizer if cloud_tokenizer is not None else device.tokenizer
        if text_keys:
            return cls(
                None,
                frozenset(),
                PromptBuilder(template, system_prompt=system_prompt),
                Aligner(device_vocabulary, None, method),
            )
        assert cloud_tokenizer is not None
        eos = tokenizer_eos_ids(cloud_tokenizer)
        cloud_vocabulary = Vocabulary.of(cloud_tokenizer, eos, cloud_width or None)
        return cls(
            cloud_tokenizer,
            eos,
            PromptBuilder(cloud_tokenizer, system_prompt=system_prompt),
            Aligner(device_vocabulary, cloud_vocabulary, method),
        )

    @property
    def text_keys(self) -> bool:
        return self.tokenizer is None

    def start(self, prompt: Prompt, device: LoadedModel) -> Crossing:
        """One generation's crossing for ``prompt``."""
        ids = self.prompts.encode(prompt)
        if self.text_keys:
            text = str(self.prompts.tokenizer.decode(ids, skip_special_tokens=False))
            return Crossing(self, text, self._device_text(device), PieceTable())
        return Crossing(self, ids, self._device_text(device), None)

    def _device_text(self, device: LoadedModel) -> DeviceText:
        return DeviceText(device.tokenizer, self.aligner.device)


@dataclass
class Crossing:
    """One generation across tokenizers: the cloud's prompt (ids, or text for a
    text-keyed cloud), the device's tokens of the text so far, the output ids' table."""

    side: CloudSide
    cloud_prompt: list[int] | str
    device_text: DeviceText
    table: PieceTable | None


_VOCABULARIES: weakref.WeakKeyDictionary[LoadedModel, Vocabulary] = weakref.WeakKeyDictionary()


def _vocabulary(model: LoadedModel) -> Vocabulary:
    """The device's vocabulary, read once per model (reading takes ~0.1 s per 50k tokens)."""
    if model not in _VOCABULARIES:
        width = int(getattr(model.model.config, "vocab_size", 0) or 0)
        _VOCABULARIES[model] = Vocabulary.of(model.tokenizer, model.eos_token_ids, width)
    return _VOCABULARIES[model]
