"""The parts every objective and modality shares: Megatron-core Transformer blocks and attention,
initialised layers, TP-aware randomness, the encoder and conv decoder, teacher targets, the loss,
EMA, and the `Modality` interface (modality.py) the modalities implement."""
