"""transformers configuration of a data2vec 2.0 image or speech encoder exported by d2v2-scale.

Shipped verbatim inside every `d2v2-export --format hf` folder of a data2vec 2.0 image/speech
model (with modeling_data2vec2.py and data2vec2_encoder.py) and loaded with
`trust_remote_code=True`; imports only transformers.  Field meanings: docs/EXPORT.md (encoder)
and docs/FINETUNE.md (fine-tuning regularizers and heads).
"""

import re

import transformers

# the range pyproject.toml's [hf] extra declares, whose floor CI tests (this code alone also ran on 5.0;
# 5.24 is the exported text tokenizer's floor, pyproject.toml): one line instead of an error deep inside
_tv = re.match(r"(\d+)\.(\d+)", transformers.__version__)
if not _tv or not (5, 24) <= (int(_tv[1]), int(_tv[2])) < (6, 0):
    raise ImportError(f"this data2vec 2.0 folder's model code needs transformers>=5.24,<6, found "
                      f"{transformers.__version__}: pip install 'transformers>=5.24,<6'")
from transformers import PretrainedConfig


class Data2Vec2Config(PretrainedConfig):
    """The plain twin's encoder fields (modality ... conv_pos_depth) plus fine-tuning settings.

    Regularizers (0 = off; the exporter writes the reference fine-tuning's values, docs/FINETUNE.md):
      drop_path_rate      stochastic depth, linear from 0 at the first block to this at the last
      layerdrop           probability of skipping a whole block (speech)
      hidden_dropout      dropout of each block's attention and MLP output before the residual add
      attention_dropout   dropout of the attention probabilities
      activation_dropout  dropout after the MLP's GELU
      final_dropout       dropout before a task head
      mask_time_prob / mask_time_length / mask_time_min_masks: speech time masks (frames replaced
                          by the learned `masked_spec_embed`), as wav2vec 2.0 fine-tuning
      mask_feature_prob / mask_feature_length / mask_feature_min_masks: speech channel masks (zeroed)
    Heads: use_fc_norm / fc_norm_eps (image: LayerNorm after mean pooling), label_smoothing
    (image classification loss on hard labels), ctc_loss_reduction / ctc_zero_infinity / vocab_size /
    pad_token_id (CTC: the blank is pad_token_id), classifier_proj_size (speech classification).
    """

    model_type = "data2vec2"

    def __init__(self, modality="image", depth=12, prenet_depth=0, embed_dim=768, num_heads=12, mlp_ratio=4.0,
                 layer_norm_eps=1e-6, pre_ln=False, alibi=False, image_size=224, patch_size=16, in_chans=3,
                 conv_feature_layers=None, conv_pos_width=95, conv_pos_groups=16, conv_pos_depth=5,
                 sample_rate=16000,
                 drop_path_rate=0.0, layerdrop=0.0, hidden_dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0, final_dropout=0.0,
                 mask_time_prob=0.0, mask_time_length=10, mask_time_min_masks=2,
                 mask_feature_prob=0.0, mask_feature_length=10, mask_feature_min_masks=0,
                 use_fc_norm=True, fc_norm_eps=1e-6, label_smoothing=0.0,
                 vocab_size=32, pad_token_id=0, ctc_loss_reduction="sum", ctc_zero_infinity=True,
                 classifier_proj_size=256, initializer_range=0.02, **kwargs):
        if modality not in ("image", "audio"):
            raise ValueError(f"Data2Vec2Config: modality={modality!r}; this code holds data2vec 2.0 image and "
                             f"speech encoders ('image' | 'audio'); text exports are RobertaModel folders")
        self.modality, self.depth, self.prenet_depth = modality, int(depth), int(prenet_depth)
        self.embed_dim, self.num_heads, self.mlp_ratio = int(embed_dim), int(num_heads), float(mlp_ratio)
        self.layer_norm_eps, self.pre_ln, self.alibi = float(layer_norm_eps), bool(pre_ln), bool(alibi)
        self.image_size, self.patch_size, self.in_chans = int(image_size), int(patch_size), int(in_chans)
        self.conv_feature_layers = [list(x) for x in (conv_feature_layers or [[512, 10, 5]] + [[512, 3, 2]] * 4
                                                       + [[512, 2, 2]] * 2)]
        self.conv_pos_width, self.conv_pos_groups = int(conv_pos_width), int(conv_pos_groups)
        self.conv_pos_depth, self.sample_rate = int(conv_pos_depth), int(sample_rate)
        self.drop_path_rate, self.layerdrop = float(drop_path_rate), float(layerdrop)
        self.hidden_dropout, self.attention_dropout = float(hidden_dropout), float(attention_dropout)
        self.activation_dropout, self.final_dropout = float(activation_dropout), float(final_dropout)
        self.mask_time_prob, self.mask_time_length = float(mask_time_prob), int(mask_time_length)
        self.mask_time_min_masks = int(mask_time_min_masks)
        self.mask_feature_prob, self.mask_feature_length = float(mask_feature_prob), int(mask_feature_length)
        self.mask_feature_min_masks = int(mask_feature_min_masks)
        self.use_fc_norm, self.fc_norm_eps, self.label_smoothing = bool(use_fc_norm), float(fc_norm_eps), \
            float(label_smoothing)
        self.vocab_size, self.pad_token_id = int(vocab_size), pad_token_id
        self.ctc_loss_reduction, self.ctc_zero_infinity = ctc_loss_reduction, bool(ctc_zero_infinity)
        self.classifier_proj_size, self.initializer_range = int(classifier_proj_size), float(initializer_range)
        # transformers' generic names, read by Trainer / pipelines
        self.hidden_size, self.num_hidden_layers = self.embed_dim, self.depth + self.prenet_depth
        self.num_attention_heads = self.num_heads
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if self.mask_feature_prob > 0 and self.mask_feature_length >= self.embed_dim:
            raise ValueError(f"Data2Vec2Config: mask_feature_length={self.mask_feature_length} >= embed_dim="
                             f"{self.embed_dim}: no channel span fits; pass a smaller mask_feature_length")
