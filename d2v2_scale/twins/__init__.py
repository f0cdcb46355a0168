"""The plain-PyTorch twins of the trained encoders and the name mapping to them.

encoder.py (PlainEncoder: data2vec 2.0, 1.0 speech/text, aqc) and beit.py (PlainBeitEncoder:
data2vec 1.0 vision) depend on torch alone, so an exported folder's model code, the probe, the
HF export and the fairseq importers are all built from them; twins/mapping.py renames Megatron
parameters (and TP shards) to the twins' names.
"""
