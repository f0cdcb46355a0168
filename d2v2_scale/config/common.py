"""What every part of the config package shares: the error type and the modality names."""

from __future__ import annotations

import difflib

MODALITIES = ("image", "audio", "text")

# (channels, kernel, stride) of the wav2vec 2.0 / data2vec audio feature extractor: 320x down
# (docs/REFERENCE.md §1.8).
AUDIO_CONV_LAYERS = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _did_you_mean(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
