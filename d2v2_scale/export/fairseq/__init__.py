"""Import released fairseq data2vec checkpoints (d2v2-import): importer.py reads the file, and
data2vec2.py / data2vec1.py map each objective's names and config to this project's."""
