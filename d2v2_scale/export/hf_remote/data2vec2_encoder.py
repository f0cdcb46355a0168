"""In the package: the plain twin under the name the shipped model code imports it by.  The
exporter writes d2v2_scale/twins/encoder.py itself, verbatim, as data2vec2_encoder.py into every
data2vec 2.0 image/speech transformers folder (hf_remote/__init__.py); this module is not copied."""

from ...twins.encoder import PlainEncoder, alibi_slopes, sincos_2d

__all__ = ["PlainEncoder", "alibi_slopes", "sincos_2d"]
