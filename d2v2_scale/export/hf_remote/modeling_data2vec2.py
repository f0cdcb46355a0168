"""transformers models of a data2vec 2.0 image or speech encoder exported by d2v2-scale.

Shipped verbatim inside every `d2v2-export --format hf` folder of a data2vec 2.0 image/speech
model and loaded with `trust_remote_code=True`; imports only torch, transformers and the two
files shipped beside it.  The encoder is the project's plain twin itself (data2vec2_encoder.py is
d2v2_scale/twins/encoder.py, copied verbatim by the exporter), so the loaded model computes what
the twin computes; this file adds the task heads and the fine-tuning regularizers
(docs/FINETUNE.md):

    Data2Vec2Model                      AutoModel: last_hidden_state [B, E+T, D], every block's
                                        output, pooler_output [B, D] (mean of the patch tokens /
                                        of the real frames)
    Data2Vec2ForImageClassification    AutoModelForImageClassification: mean pooling, LayerNorm
                                        (fc_norm), linear head: the reference's fine-tuning head
    Data2Vec2ForCTC                     AutoModelForCTC: dropout + linear over the vocabulary
    Data2Vec2ForAudioClassification    AutoModelForAudioClassification: projector, mean over
                                        real frames, linear
"""

from dataclasses import dataclass
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
import transformers

# the range pyproject.toml's [hf] extra declares, whose floor CI tests (this code alone also ran on 5.0;
# 5.24 is the exported text tokenizer's floor, pyproject.toml): one line instead of an error deep inside
_tv = re.match(r"(\d+)\.(\d+)", transformers.__version__)
if not _tv or not (5, 24) <= (int(_tv[1]), int(_tv[2])) < (6, 0):
    raise ImportError(f"this data2vec 2.0 folder's model code needs transformers>=5.24,<6, found "
                      f"{transformers.__version__}: pip install 'transformers>=5.24,<6'")
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (BaseModelOutputWithPooling, CausalLMOutput, ImageClassifierOutput,
                                           SequenceClassifierOutput)
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from .configuration_data2vec2 import Data2Vec2Config
from .data2vec2_encoder import PlainEncoder, alibi_slopes, sincos_2d

@dataclass
class Data2Vec2ModelOutput(BaseModelOutputWithPooling):
    """+ frame_padding [B, T] (speech: True = padded frame) or None."""

    frame_padding: Optional[torch.Tensor] = None


_NAME = {"image": "image", "audio": "speech"}
_HEAD_OF = {"image": "AutoModelForImageClassification (Data2Vec2ForImageClassification)",
            "audio": "AutoModelForCTC (Data2Vec2ForCTC) or AutoModelForAudioClassification"}


def _need(config, modality, what):
    if config.modality != modality:
        raise ValueError(f"{what} needs a data2vec 2.0 {_NAME[modality]} encoder; this folder holds the "
                         f"{_NAME[config.modality]} encoder: use {_HEAD_OF[config.modality]}")


class Data2Vec2PreTrainedModel(PreTrainedModel):
    config_class = Data2Vec2Config
    base_model_prefix = "data2vec2"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    # The heads' losses are means over their own batch and take no `num_items_in_batch`: without
    # this, Trainer (which guesses from **kwargs) multiplies the loss by the number of processes and
    # skips its division by gradient_accumulation_steps (docs/FINETUNE.md "Multi-GPU and multi-node")
    accepts_loss_kwargs = False

    def _init_weights(self, module):
        """Random init (the from-scratch twin of a fine-tuning run): linear layers N(0, 0.02) as the
        reference's heads; the twin's non-persistent tables are rebuilt (they are not in the weights)."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            init.kaiming_normal_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, PlainEncoder):
            c = module.c
            if module.extra_tokens is not None:
                init.trunc_normal_(module.extra_tokens, std=self.config.initializer_range)
                init.copy_(module.pos_table, sincos_2d(c.embed_dim, c.image_size // c.patch_size)[None])
            if module.alibi_scale is not None:
                init.ones_(module.alibi_scale)
                init.copy_(module.slopes, alibi_slopes(c.num_heads))
        elif isinstance(module, Data2Vec2Model) and module.masked_spec_embed is not None:
            init.uniform_(module.masked_spec_embed)

    def freeze_feature_encoder(self):
        """Speech: no gradient into the CNN feature encoder (the reference's feature_grad_mult 0)."""
        base = getattr(self, self.base_model_prefix, self)
        for p in base.encoder.local.cnn.parameters():
            p.requires_grad = False


class Data2Vec2Model(Data2Vec2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if config.modality == "audio":
            self.main_input_name = "input_values"
        self.encoder = PlainEncoder(config)
        n = len(self.encoder.blocks)
        for i, blk in enumerate(self.encoder.blocks):  # the reference: linspace(0, drop_path_rate) over the blocks
            blk.drop_path = config.drop_path_rate * i / max(n - 1, 1)
            blk.dropout = config.hidden_dropout
            blk.attn.attn_drop = config.attention_dropout
            blk.mlp.act_drop = config.activation_dropout
        self.encoder.layerdrop = config.layerdrop
        self.masked_spec_embed = None
        if config.modality == "audio":
            self.masked_spec_embed = nn.Parameter(torch.zeros(config.embed_dim))
            if config.mask_time_prob > 0 or config.mask_feature_prob > 0:
                self.encoder.feature_mask = self._mask_features
        self.post_init()

    def _mask_features(self, x, pad):
        """x [B, T, D] local features -> time spans replaced by masked_spec_embed, channel spans zeroed."""
        c, (b, t, d) = self.config, x.shape
        keep = None if pad is None else (~pad).long()
        if c.mask_time_prob > 0:
            m = _compute_mask_indices((b, t), c.mask_time_prob, c.mask_time_length, attention_mask=keep,
                                      min_masks=c.mask_time_min_masks)
            m = torch.as_tensor(m, device=x.device, dtype=torch.bool)
            x = torch.where(m[..., None], self.masked_spec_embed.to(x.dtype), x)
        if c.mask_feature_prob > 0:
            m = _compute_mask_indices((b, d), c.mask_feature_prob, c.mask_feature_length,
                                      min_masks=c.mask_feature_min_masks)
            m = torch.as_tensor(m, device=x.device, dtype=torch.bool)
            x = x.masked_fill(m[:, None, :], 0.0)
        return x

    def forward(self, pixel_values=None, input_values=None, attention_mask=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        """pixel_values [B, C, H, W] (image) | input_values [B, S] + attention_mask [B, S] (speech, 1 = real)."""
        if self.config.modality == "image":
            if pixel_values is None:
                raise ValueError("Data2Vec2Model: an image encoder takes pixel_values (use the folder's image processor)")
            src, padm = pixel_values, None
        else:
            if input_values is None:
                raise ValueError("Data2Vec2Model: a speech encoder takes input_values (use the folder's feature extractor)")
            src = input_values
            padm = None if attention_mask is None else ~attention_mask.bool()
        out = self.encoder(src, padm)
        x, pad = out["x"], out["padding"]
        if self.config.modality == "image":
            e = 1 if self.encoder.extra_tokens is not None else 0
            pooled = x[:, e:].mean(1)
        elif pad is None:
            pooled = x.mean(1)
        else:
            real = (~pad).to(x.dtype)[..., None]
            pooled = (x * real).sum(1) / real.sum(1).clamp_min(1.0)
        hidden = (out["input"], *out["hidden"]) if output_hidden_states else None
        if return_dict is False:
            return (x, pooled) + ((hidden,) if hidden is not None else ())
        return Data2Vec2ModelOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden, frame_padding=pad)


class Data2Vec2ForImageClassification(Data2Vec2PreTrainedModel):
    """The reference's image fine-tuning head: mean over the patch tokens (CLS dropped), LayerNorm
    (eps 1e-6), linear; loss: cross-entropy with label_smoothing on hard labels [B], soft-target
    cross-entropy on mixed labels [B, num_labels] (mixup / cutmix)."""

    def __init__(self, config):
        super().__init__(config)
        _need(config, "image", "Data2Vec2ForImageClassification")
        self.data2vec2 = Data2Vec2Model(config)
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=config.fc_norm_eps) if config.use_fc_norm else None
        self.dropout = nn.Dropout(config.final_dropout)
        self.classifier = nn.Linear(config.embed_dim, config.num_labels)
        self.post_init()

    def forward(self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.data2vec2(pixel_values=pixel_values, output_hidden_states=output_hidden_states)
        x = out.pooler_output
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        logits = self.classifier(self.dropout(x))
        loss = None
        if labels is not None:
            if labels.dim() == 2 and labels.is_floating_point():
                loss = torch.sum(-labels * F.log_softmax(logits.float(), -1), -1).mean()
            else:
                smooth = self.config.label_smoothing if self.training else 0.0
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=smooth)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class Data2Vec2ForCTC(Data2Vec2PreTrainedModel):
    """Speech recognition: dropout + linear [D -> vocab_size] per frame, CTC loss (blank = pad_token_id)."""

    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        _need(config, "audio", "Data2Vec2ForCTC")
        self.data2vec2 = Data2Vec2Model(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.lm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.post_init()

    def forward(self, input_values=None, attention_mask=None, labels=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        """labels [B, L] letter ids, -100 after each transcript -> loss; logits [B, T, vocab_size]."""
        out = self.data2vec2(input_values=input_values, attention_mask=attention_mask,
                             output_hidden_states=output_hidden_states)
        logits = self.lm_head(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"a label id {int(labels.max())} >= vocab_size {self.config.vocab_size}")
            pad = out.frame_padding
            t = logits.shape[1]
            in_len = torch.full((logits.shape[0],), t, dtype=torch.long, device=logits.device) if pad is None \
                else (~pad).sum(1)
            real = labels >= 0
            lp = F.log_softmax(logits, -1, dtype=torch.float32).transpose(0, 1)
            with torch.backends.cudnn.flags(enabled=False):
                loss = F.ctc_loss(lp, labels.masked_select(real), in_len, real.sum(-1), blank=self.config.pad_token_id,
                                  reduction=self.config.ctc_loss_reduction, zero_infinity=self.config.ctc_zero_infinity)
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class Data2Vec2ForAudioClassification(Data2Vec2PreTrainedModel):
    """Utterance classification: projector [D -> classifier_proj_size], mean over the real frames, linear."""

    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        _need(config, "audio", "Data2Vec2ForAudioClassification")
        self.data2vec2 = Data2Vec2Model(config)
        self.projector = nn.Linear(config.embed_dim, config.classifier_proj_size)
        self.classifier = nn.Linear(config.classifier_proj_size, config.num_labels)
        self.post_init()

    def forward(self, input_values=None, attention_mask=None, labels=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        out = self.data2vec2(input_values=input_values, attention_mask=attention_mask,
                             output_hidden_states=output_hidden_states)
        h, pad = self.projector(out.last_hidden_state), out.frame_padding
        if pad is None:
            pooled = h.mean(1)
        else:
            real = (~pad).to(h.dtype)[..., None]
            pooled = (h * real).sum(1) / real.sum(1).clamp_min(1.0)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
