"""Mixup / CutMix of the image fine-tuning recipe, batch mode: timm's `timm.data.Mixup` (1.0.x)
restated with numpy + torch only, drawing from numpy's global RNG in the same order, so that
given the same `np.random` state it returns the same images and targets bit for bit
(tests/test_finetune_mixup.py checks it against timm's own mixup.py, tests/timm_mixup_oracle.py).

Why a copy of a maintained library: `import timm` imports torchvision, and a CPU-only torch has
no matching torchvision in the package registry (the registry's wheel is CUDA-linked and fails
at import), so on such a machine timm cannot be imported at all.  finetune/image.py uses timm's
class whenever `timm.data` imports and this one otherwise (docs/FINETUNE.md, "Mixup and CutMix").

Only what the recipe (finetune/recipes.py IMAGE_REFERENCE, as the reference's fine-tuning) uses
is here: mode 'batch' (one lam and one box per batch, mixing each image with its batch mirror
x.flip(0)), the mixup/cutmix switch, the per-batch application probability, the cutmix box with
the lam correction for the part clipped at the border (or a min/max ratio box), and label
smoothing folded into the mixed one-hot targets.
"""

from __future__ import annotations

import numpy as np
import torch


def one_hot(x, num_classes: int, on_value: float = 1.0, off_value: float = 0.0) -> torch.Tensor:
    """x [B] class ids -> [B, num_classes] (default float dtype): off_value, on_value at x."""
    x = x.long().view(-1, 1)
    return torch.full((x.size()[0], num_classes), off_value, device=x.device).scatter_(1, x, on_value)


def mixup_target(target, num_classes: int, lam=1.0, smoothing: float = 0.0) -> torch.Tensor:
    """target [B] class ids -> [B, num_classes]: the smoothed one-hot (smoothing / num_classes
    everywhere, 1 - smoothing on top at the class) mixed with its batch mirror,
    lam * y + (1 - lam) * y.flip(0); every row sums to 1."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value=on_value, off_value=off_value)
    y2 = y1.flip(0)
    return y1 * lam + y2 * (1.0 - lam)


def rand_bbox(img_shape, lam, margin: float = 0.0, count=None):
    """The CutMix box of area ~(1 - lam) * H * W: sides sqrt(1 - lam) * (H, W) (floored), a
    uniform centre (cy first, then cx), clipped to the image -> (y_lo, y_hi, x_lo, x_hi)."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    margin_y, margin_x = int(margin * cut_h), int(margin * cut_w)
    cy = np.random.randint(0 + margin_y, img_h - margin_y, size=count)
    cx = np.random.randint(0 + margin_x, img_w - margin_x, size=count)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + (cut_h + 1) // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + (cut_w + 1) // 2, 0, img_w)
    return yl, yh, xl, xh


def rand_bbox_minmax(img_shape, minmax, count=None):
    """A box whose sides are uniform in [min, max) of (H, W), placed uniformly inside the image."""
    if len(minmax) != 2:
        raise ValueError(f"cutmix_minmax must be (min, max), got {minmax!r}")
    img_h, img_w = img_shape[-2:]
    cut_h = np.random.randint(int(img_h * minmax[0]), int(img_h * minmax[1]), size=count)
    cut_w = np.random.randint(int(img_w * minmax[0]), int(img_w * minmax[1]), size=count)
    yl = np.random.randint(0, img_h - cut_h + 1, size=count)
    xl = np.random.randint(0, img_w - cut_w + 1, size=count)
    return yl, yl + cut_h, xl, xl + cut_w


def cutmix_bbox_and_lam(img_shape, lam, ratio_minmax=None, correct_lam: bool = True, count=None):
    """The box, and lam = 1 - (box area after clipping) / (H * W) when corrected (always with a
    min/max box): the targets then weigh each image by the pixels it really keeps."""
    if ratio_minmax is not None:
        yl, yu, xl, xu = rand_bbox_minmax(img_shape, ratio_minmax, count=count)
    else:
        yl, yu, xl, xu = rand_bbox(img_shape, lam, count=count)
    if correct_lam or ratio_minmax is not None:
        bbox_area = (yu - yl) * (xu - xl)
        lam = 1.0 - bbox_area / float(img_shape[-2] * img_shape[-1])
    return (yl, yu, xl, xu), lam


class Mixup:
    """Batch-mode Mixup / CutMix with timm.data.Mixup's arguments and results.

    Per call (batch x [B, C, H, W] float, B even; target [B] class ids): with probability `prob`
    the batch is mixed, by CutMix with probability `switch_prob` when both alphas are > 0 (lam ~
    Beta(cutmix_alpha, cutmix_alpha), the box of x.flip(0) pasted in place), else by mixup (lam ~
    Beta(mixup_alpha, mixup_alpha), x = lam * x + (1 - lam) * x.flip(0)).  Returns x (mixed in
    place) and the targets [B, num_classes] of mixup_target (label smoothing included)."""

    def __init__(self, mixup_alpha=1.0, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.5,
                 mode="batch", correct_lam=True, label_smoothing=0.1, num_classes=1000):
        if mode != "batch":
            raise ValueError(f"mixup mode {mode!r}: only 'batch' (the recipe's) is implemented here; "
                             "install timm for 'pair' / 'elem'")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.cutmix_minmax = cutmix_minmax
        if self.cutmix_minmax is not None:
            if len(self.cutmix_minmax) != 2:
                raise ValueError(f"cutmix_minmax must be (min, max), got {cutmix_minmax!r}")
            self.cutmix_alpha = 1.0  # as timm: a min/max box means CutMix is on, its lam comes from the box
        if not (self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0):
            raise ValueError("mixup: one of mixup_alpha > 0, cutmix_alpha > 0, cutmix_minmax must be set")
        self.mix_prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.mode = mode
        self.correct_lam = correct_lam
        self.mixup_enabled = True  # a training loop may switch mixing off (timm's attribute)

    def _params_per_batch(self):
        lam = 1.0
        use_cutmix = False
        if self.mixup_enabled and np.random.rand() < self.mix_prob:
            if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
                use_cutmix = np.random.rand() < self.switch_prob
                lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha) if use_cutmix else \
                    np.random.beta(self.mixup_alpha, self.mixup_alpha)
            elif self.mixup_alpha > 0.0:
                lam_mix = np.random.beta(self.mixup_alpha, self.mixup_alpha)
            else:
                use_cutmix = True
                lam_mix = np.random.beta(self.cutmix_alpha, self.cutmix_alpha)
            lam = float(lam_mix)
        return lam, use_cutmix

    def _mix_batch(self, x):
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=self.cutmix_minmax,
                                                        correct_lam=self.correct_lam)
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam

    def __call__(self, x, target):
        if len(x) % 2:
            raise ValueError(f"mixup needs an even batch (each image mixes with its mirror), got {len(x)}")
        lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)
