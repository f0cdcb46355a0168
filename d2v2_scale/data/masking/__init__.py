"""The mask generators, one module per objective's masks: data2vec2.py (exact-count inverse block
/ span / token masks, M clones), data2vec1.py (speech and text spans, BERT inputs) and beit.py
(BEiT blockwise image masks of data2vec 1.0 vision)."""
