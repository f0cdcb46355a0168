"""One module per objective: data2vec 2.0 (data2vec2.py), data2vec 1.0 (data2vec1.py) and
data2vec-aqc (aqc/: the model, its quantizer, k-means and cross-contrastive losses).  What each
objective is, as data (masks, gather, copied teacher parts, HF classes), is d2v2_scale/objectives.py."""
