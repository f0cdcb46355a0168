"""The `model` section: encoder, front ends, targets, decoder, loss and the objective's own knobs.

The section is written as one dataclass per concern (the shared encoder, one per modality's
front end, targets, the 2.0 decoder, the loss, the objective, data2vec 1.0, its BEiT vision
block, data2vec-aqc) that `ModelConfig` combines.  The combination stays flat on purpose:
every part of the harness, the tests, saved `config.yaml` files, exported folders and
command-line overrides read and write `model.<field>` (`cfg.model.depth`,
`model.aqc_vq_dim=32`), and a run folder written before this split must keep loading.  The
sections give each field its place and its documentation; `ModelConfig.sections()` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .common import AUDIO_CONV_LAYERS


@dataclass
class EncoderSection:
    """The Transformer every objective and modality shares (docs/REFERENCE.md §1.2)."""

    modality: str = "image"
    depth: int = 10  # shared blocks (the ones that can provide targets)
    prenet_depth: int = 0  # context-encoder blocks before the shared ones; never targets
    embed_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # residual/attention/activation dropout in the blocks
    # Dropout on the encoder input (docs/REFERENCE.md §1.10 D3/D7): audio/image after the context
    # LayerNorm, per clone; text on the embeddings once per sample, before cloning (the teacher sees
    # the same tensor).  None: model.dropout (the reference uses 0.1 for audio/text, 0 for images).
    encoder_input_dropout: float | None = None
    # Dropout on the student output before the decoder fills the masked slots (docs/REFERENCE.md
    # §1.10 D2).  None: model.dropout.
    decoder_input_dropout: float | None = None
    layer_norm_eps: float = 1e-6
    layerdrop: float = 0.0
    pre_ln: bool = False  # the reference's default is post-LN; pre-LN allowed for very large models
    # Per block "none" | "full" | "selective" recomputation of activations.
    activation_checkpointing: str = "none"

    @property
    def total_blocks(self) -> int:
        return self.depth + self.prenet_depth

    @property
    def input_dropout(self) -> float:
        return self.dropout if self.encoder_input_dropout is None else self.encoder_input_dropout

    @property
    def decoder_dropout(self) -> float:
        return self.dropout if self.decoder_input_dropout is None else self.decoder_input_dropout


@dataclass
class ImageSection:
    """Image front end: patch embedding (docs/REFERENCE.md §1.8)."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AudioSection:
    """Audio front end: CNN feature extractor, conv positions, ALiBi (docs/REFERENCE.md §1.2, §1.8)."""

    conv_feature_layers: list = field(default_factory=lambda: [list(x) for x in AUDIO_CONV_LAYERS])
    conv_pos_width: int = 19
    conv_pos_groups: int = 16
    conv_pos_depth: int = 5
    alibi: bool = False  # ALiBi bias with a learned per-head scale (audio)

    def audio_frames(self, n_samples: int) -> int:
        """Frames out of the CNN feature extractor for `n_samples` waveform samples."""
        n = int(n_samples)
        for _, kernel, stride in self.conv_feature_layers:
            n = (n - kernel) // stride + 1
        return max(n, 0)


@dataclass
class TextSection:
    """Text front end: token table and learned positions (docs/REFERENCE.md §1.8)."""

    vocab_size: int = 50000
    max_positions: int = 512
    pad_token_id: int = 1


@dataclass
class TargetSection:
    """Multi-mask and the teacher's targets (docs/REFERENCE.md §1.1, §1.3)."""

    clone_batch: int = 16  # M
    top_k_layers: int = 10  # K
    instance_norm_target_layer: bool = True
    layer_norm_target_layer: bool = False
    instance_norm_targets: bool = False
    layer_norm_targets: bool = True


@dataclass
class DecoderSection:
    """data2vec 2.0's convolutional decoder (docs/REFERENCE.md §1.5); data2vec 1.0 sets decoder_layers=0."""

    decoder_dim: int = 768
    decoder_kernel: int = 3
    decoder_layers: int = 6
    decoder_groups: int = 16
    decoder_residual: bool = True
    # masked slots enter the decoder as N(0, std^2) noise (docs/REFERENCE.md §1.5: 0.01)
    decoder_noise_std: float = 0.01
    # the decoder's final projection (docs/REFERENCE.md §1.10 D1): 1 = Linear(decoder_dim, D); 2 (text) =
    # Linear(decoder_dim, ratio * decoder_dim) -> GELU -> Linear(ratio * decoder_dim, D)
    decoder_projection_layers: int = 1
    decoder_projection_ratio: float = 2.0


@dataclass
class LossSection:
    """The regression loss (docs/REFERENCE.md §1.6)."""

    loss_beta: float = 0.0  # > 0: smooth-L1 with this beta
    loss_scale: float | None = None  # None: 1/sqrt(D)
    cls_loss_weight: float = 0.0  # image: 0.01


@dataclass
class ObjectiveSection:
    """Which objective the run trains."""

    # objective: "data2vec2" (model/objectives/data2vec2.py), "data2vec1" (model/objectives/data2vec1.py, docs/DATA2VEC1.md) or
    # "data2vec_aqc" (model/objectives/aqc/, docs/AQC.md); its record: objectives.py
    variant: str = "data2vec2"


@dataclass
class Data2vec1Section:
    """data2vec 1.0 (model.variant=data2vec1; docs/REFERENCE.md §2, docs/DATA2VEC1.md)."""

    # teacher tap: "ffn" = the FFN output before the residual and LN2 (speech, text, 2.0);
    # "block_end" = the block output after its last residual (vision)
    target_tap: str = "ffn"
    # loss scale when loss_scale is None: "inv_sqrt_dim" (1/sqrt(D): speech, 2.0), "inv_dim"
    # (1/D: vision's mean over elements), "one"
    loss_scale_rule: str = "inv_sqrt_dim"
    # regression head on the student's output at masked positions: 1 = Linear(D, D) (speech,
    # vision); 2 = Linear(D, 2D) -> GELU -> Linear(2D, D) (text)
    head_layers: int = 1


@dataclass
class BeitSection:
    """BEiT-style vision of data2vec 1.0 (model/modalities/beit.py; docs/REFERENCE.md §2.4); the defaults leave
    the 2.0 ViT unchanged."""

    image_block: str = "vit2"  # "vit2" (the 2.0 block, model/core/blocks.py) | "beit" (model/modalities/beit.py)
    layer_scale_init: float = 1e-4  # BEiT layer scale gamma_1/gamma_2 init (base 1e-4, large 1e-5); 0: none
    drop_path: float = 0.0  # stochastic depth of the last block; block i gets drop_path * i / (blocks - 1)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (BEiT blocks)
    shared_rel_pos_bias: bool = True  # one relative position bias table for all blocks (else one per block)


@dataclass
class AqcSection:
    """data2vec-aqc (model.variant=data2vec_aqc; docs/REFERENCE.md §3.3-§3.8, docs/AQC.md): the 1.0
    speech objective plus a Gumbel quantizer, per-step k-means and two cross-contrastive losses."""

    aqc_latent_groups: int = 2  # G codebooks
    aqc_latent_vars: int = 320  # V entries per codebook
    aqc_vq_dim: int = 256  # quantized width (final_proj_dim; also project_q and contr_proj's output)
    aqc_latent_temp: tuple = (2.0, 0.5, 0.999995)  # Gumbel temperature max(2 * 0.999995^u, 0.5)
    aqc_num_negatives: int = 100  # per masked frame, same utterance and view, with replacement
    aqc_cluster_factor: int = 16  # k-means clusters per step: max(2, T // factor)
    aqc_logit_temp: float = 0.1  # cosine / temperature
    aqc_same_cluster_scale: float = 0.3  # same-cluster negatives' logits are multiplied by this
    # the reference scales same-cluster logits only in batches where some negative has the
    # positive's codes (a quirk, docs/REFERENCE.md §3.7): false (faithful default) always scales,
    # true copies the gating
    aqc_gate_scaling_on_identical: bool = False
    aqc_contrastive_weight: float = 0.5  # weight of each of L_s and L_t
    aqc_diversity_weight: float = 0.1  # x N_m x (G V - prob_perplexity) / (G V)
    aqc_features_pen_weight: float = 10.0  # x N_m x mean(CNN features^2) of the original view


# The sections in reading order: the order of the fields in `config.yaml` and `--print-config`,
# with the heading each gets there.
SECTION_TITLES = {
    EncoderSection: "encoder (every objective and modality)",
    ImageSection: "image front end",
    AudioSection: "audio front end",
    TextSection: "text front end",
    TargetSection: "clones and teacher targets",
    DecoderSection: "decoder (data2vec 2.0)",
    LossSection: "loss",
    ObjectiveSection: "objective",
    Data2vec1Section: "data2vec 1.0 (variant data2vec1, data2vec_aqc)",
    BeitSection: "BEiT image block (data2vec 1.0 vision)",
    AqcSection: "data2vec-aqc (variant data2vec_aqc)",
}
MODEL_SECTIONS = tuple(SECTION_TITLES)


@dataclass
class ModelConfig(*reversed(MODEL_SECTIONS)):  # dataclasses take base fields last base first
    """Encoder, decoder and target construction: the fields of every section above, flat."""

    @classmethod
    def sections(cls) -> dict[str, list[str]]:
        """{section class name: its field names}, in reading order."""
        return {s.__name__: [f.name for f in fields(s)] for s in MODEL_SECTIONS}
