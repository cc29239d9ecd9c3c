"""Steering across tokenizers: a cloud and a device model from different families, or a
cloud that keys its log-probs by text.

The seam between the two token spaces, in one place rather than spread through the
scheduler: `vocabulary` (what each token spells, as bytes), `aligner` (the cloud's
candidates scored by the device: the paper's vocabulary intersection, or ours, which
keeps every candidate), `device_text` (the emitted text in the device's own tokens,
re-tokenized over a look-behind window as it grows), `loop` (the per-token loop) and
`crossing` (what a client decides once, and each generation's share).
"""

from costeer_sdk.alignment.aligner import METHODS, Aligner, AlignmentMethod
from costeer_sdk.alignment.device_text import DeviceText
from costeer_sdk.alignment.vocabulary import Vocabulary

__all__ = ["METHODS", "Aligner", "AlignmentMethod", "DeviceText", "Vocabulary"]
