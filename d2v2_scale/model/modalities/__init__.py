"""One `Modality` per input kind (image.py, audio.py, text.py; the `Modality` interface is
model/core/modality.py) and the BEiT image encoder of data2vec 1.0 vision (beit.py)."""

from .audio import Audio
from .image import Image
from .text import Text

# model.modality -> its class: the one place a modality name meets its code
MODALITIES = {"image": Image, "audio": Audio, "text": Text}


def get_modality(mcfg):
    """The `Modality` (model/core/modality.py) of model.modality, built on the model config."""
    if mcfg.modality not in MODALITIES:
        raise ValueError(f"model.modality={mcfg.modality!r}: known {sorted(MODALITIES)}")
    return MODALITIES[mcfg.modality](mcfg)
