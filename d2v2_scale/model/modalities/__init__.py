"""One `Modality` per input kind (image.py, audio.py, text.py; the `Modality` interface is
model/core/modality.py) and the BEiT image encoder of data2vec 1.0 vision (beit.py)."""
