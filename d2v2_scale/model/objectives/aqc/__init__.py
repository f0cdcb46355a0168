"""data2vec-aqc (docs/AQC.md): the model (model.py), the Gumbel quantizer (quantizer.py), cosine
k-means (kmeans.py) and the cross-contrastive losses (contrastive.py)."""
