"""FCMAE: fully convolutional masked autoencoder (Woo et al., ConvNeXt V2, CVPR 2023, Sec. 2), dense-masked.

The official code runs the encoder as a sparse ConvNet (MinkowskiEngine). Here the encoder is a plain
timm ``convnextv2_*`` model run *dense-masked*, the formulation the paper's own results used: zero the
masked positions after the stem and before and after every depthwise conv, and compute GRN statistics
over visible positions only (``models.grn.global_response_norm``). Every other layer (LayerNorm, 1x1
convs / linears, GELU, the 2x2 stride-2 downsampling convs) acts per position or inside one mask cell,
so the encoder output at visible positions is exactly independent of the pixels under the mask.

Masks are (N, h, w) with 1 = masked. The encoder works on the *final-stage grid* (h, w) = image / stride
(stride 32 for ConvNeXt); the mask is upsampled (repeat) to every stage's resolution. ``patch_size``
(a multiple of the stride) sets the masking granularity: the mask is drawn on the (H/p, W/p) grid and
repeated to (h, w). The decoder predicts, at each final-grid position, that position's stride x stride
pixels (``stride**2 * 3`` values); with the paper default ``patch_size == stride == 32`` one
position is one patch.

The encoder keeps timm's own module tree and state_dict keys, so it exports straight into
``timm.create_model(arch, num_classes=0)``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.grn import GRN, global_response_norm


# ------------------------------------------------------------------------------------------ masks
def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per image: ``L - int(L * (1 - ratio))`` (official FCMAE: 30 of 49 at 0.6). The same
    count for every image."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return num_patches - int(num_patches * (1.0 - mask_ratio))


def random_mask(
    n: int, h: int, w: int, mask_ratio: float, *, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n, h, w) float mask, exactly ``num_masked(h*w, ratio)`` ones per image, uniformly placed."""
    L = h * w
    noise = torch.rand(n, L, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each position in a random order
    return (ranks < num_masked(L, mask_ratio)).float().reshape(n, h, w)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w) -> (N, h*factor, w*factor) by repetition (nearest)."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def _keep_at(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """1 - mask, repeated to the spatial size of the feature map `like`, as (N, 1, H, W) in its dtype.
    Zeroing is a multiply by this: about 2x faster on CPU than masked_fill with a broadcast bool mask."""
    size = like.shape[-2:]
    h, w = mask.shape[-2:]
    fy, fx = size[0] // h, size[1] // w
    if fy != fx or fy * h != size[0] or fx * w != size[1]:
        raise ValueError(f"mask grid {h}x{w} does not divide the feature map {size[0]}x{size[1]}")
    return (1.0 - upsample_mask(mask, fy).to(like.dtype)).unsqueeze(1)


# ------------------------------------------------------------------------------------------ patches
def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), L = (H/p)(W/p) row-major; values ordered (row, col, channel) as in
    the official MAE/FCMAE code."""
    n, c, hh, ww = images.shape
    h, w = hh // p, ww // p
    x = images.reshape(n, c, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (N, h*w, p*p*C) -> (N, C, h*p, w*p)."""
    n = x.shape[0]
    x = x.reshape(n, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, h * p, w * p)


def patch_targets(images: torch.Tensor, p: int, norm_pix_loss: bool = True, eps: float = 1e-6):
    """Targets (N, L, p*p*3) and the per-patch (mean, std) used to normalise them (None if not)."""
    target = patchify(images, p)
    if not norm_pix_loss:
        return target, None
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()  # unbiased variance, as in MAE/FCMAE
    return (target - mean) / std, (mean, std)


def fcmae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE. `pred` (N, p*p*3, h, w) with p = H / h, `mask`
    (N, h, w), 1 = masked; visible patches contribute nothing."""
    n, _, h, w = pred.shape
    p = images.shape[-1] // w
    target, _ = patch_targets(images, p, norm_pix_loss)
    pred = pred.reshape(n, -1, h * w).transpose(1, 2)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.reshape(n, h * w).to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


# ------------------------------------------------------------------------------------------ encoder
class MaskedEncoder(nn.Module):
    """Dense-masked forward of a timm ConvNeXt V2 (``convnextv2_atto`` ... ``huge``; any timm ConvNeXt with
    GRN MLPs). Holds the timm model itself (`self.model`), so its parameters and keys stay timm's.

    `register=False` keeps only a reference (no submodule, no state_dict keys), for a model that another
    module already owns -- e.g. ``PretrainModule.backbone``, so a checkpoint holds the encoder once."""

    def __init__(self, model: nn.Module, register: bool = True) -> None:
        super().__init__()
        for name in ("stem", "stages"):
            if not hasattr(model, name):
                raise ValueError(f"MaskedEncoder needs a timm ConvNeXt (with .stem and .stages), got {type(model).__name__}")
        blocks = [b for s in model.stages for b in s.blocks]
        if not all(hasattr(b, "conv_dw") and hasattr(b.mlp, "grn") for b in blocks):
            raise ValueError("MaskedEncoder needs ConvNeXt V2 blocks (depthwise conv + GRN MLP): use timm 'convnextv2_*'")
        if register:
            self.model = model
        else:
            object.__setattr__(self, "model", model)  # a plain attribute: not a submodule of this module
        self.stride = int(model.feature_info[-1]["reduction"])
        self.num_features = int(model.num_features)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) (finite), mask (N, H/stride, W/stride), 1 = masked -> features (N, C, h, w),
        zero at masked positions."""
        m = self.model
        x = m.stem(images)
        x = x * _keep_at(mask, x)
        for stage in m.stages:
            x = stage.downsample(x)
            keep = _keep_at(mask, x)
            for block in stage.blocks:
                x = self._block(block, x, keep)
        x = m.norm_pre(x)
        return x * _keep_at(mask, x)

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = block.conv_dw(x * keep) * keep
        grid_mask = 1.0 - keep.squeeze(1)
        if block.use_conv_mlp:
            x = _masked_mlp(block.mlp, block.norm(x), grid_mask, channels_last=False)
        else:
            x = x.permute(0, 2, 3, 1)
            x = _masked_mlp(block.mlp, block.norm(x), grid_mask, channels_last=True).permute(0, 3, 1, 2)
        if block.gamma is not None:
            x = x.mul(block.gamma.reshape(1, -1, 1, 1))
        return block.drop_path(x) + block.shortcut(shortcut)


def _masked_mlp(mlp: nn.Module, x: torch.Tensor, mask: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """timm GlobalResponseNormMlp with the GRN statistics over visible positions."""
    x = mlp.drop1(mlp.act(mlp.fc1(x)))
    x = global_response_norm(x, mlp.grn.weight, mlp.grn.bias, mask, mlp.grn.eps, channels_last=channels_last)
    return mlp.drop2(mlp.fc2(x))


# ------------------------------------------------------------------------------------------ decoder
class ConvNeXtV2Block(nn.Module):
    """ConvNeXt V2 block (official layout): 7x7 depthwise conv -> LayerNorm -> Linear 4x -> GELU -> GRN ->
    Linear, plus the residual. No LayerScale."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 3, 1, 2)


class FCMAE(nn.Module):
    """Masked encoder + light decoder + masked-patch loss.

    `encoder`: a timm ConvNeXt V2 name (created with random weights, ``num_classes=0``) or such a model;
    `own_encoder=False` references a given model without registering it (its owner saves and moves it).
    `forward_encoder(images, mask)` -> (N, C, h, w), mask (N, h, w) on the final-stage grid;
    `forward(images, mask=None)` -> (loss, pred (N, stride**2*3, h, w), mask (N, h, w)); `mask` may be
    given on the final-stage grid or on the (H/patch_size, W/patch_size) patch grid; None draws one.
    """

    def __init__(
        self,
        encoder: str | nn.Module = "convnextv2_atto",
        mask_ratio: float = 0.6,
        patch_size: int = 32,
        decoder_dim: int = 512,
        norm_pix_loss: bool = True,
        decoder_depth: int = 1,
        in_chans: int = 3,
        own_encoder: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(encoder, str):
            from models.backbones import create_backbone

            encoder = create_backbone(encoder)
        self.encoder = MaskedEncoder(encoder, register=own_encoder)
        self.stride = self.encoder.stride
        if patch_size <= 0 or patch_size % self.stride:
            raise ValueError(
                f"patch_size ({patch_size}) must be a positive multiple of the encoder's total stride ({self.stride})")
        num_masked(1, mask_ratio)  # validates the ratio
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(patch_size)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[ConvNeXtV2Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, self.stride**2 * in_chans, kernel_size=1)
        self._init_decoder()

    def _init_decoder(self) -> None:
        # official FCMAE: trunc-normal(0.02) weights, zero biases, mask token N(0, 0.02)
        for module in [self.proj, self.decoder, self.pred]:
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) that take no weight decay beyond the 1-D ones: the mask
        token and the decoder's GRN gamma/beta ((1, 1, 1, C) shaped)."""
        return {"mask_token"} | {n for n, _ in self.decoder.named_parameters(prefix="decoder") if ".grn." in n}

    # ---- grids ----------------------------------------------------------------------------------
    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Final-stage grid (h, w) of an image size; raises unless both sides are multiples of patch_size."""
        H, W = image_hw
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {self.patch_size}")
        return H // self.stride, W // self.stride

    def random_mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh (N, h, w) mask on the final-stage grid, drawn on the patch grid."""
        H, W = images.shape[-2:]
        self.grid_size((H, W))
        m = random_mask(images.shape[0], H // self.patch_size, W // self.patch_size, self.mask_ratio,
                        generator=generator, device=images.device)
        return upsample_mask(m, self.patch_size // self.stride)

    def to_final_grid(self, mask: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        h, w = self.grid_size(image_hw)
        if tuple(mask.shape[-2:]) == (h, w):
            return mask
        ph, pw = image_hw[0] // self.patch_size, image_hw[1] // self.patch_size
        if tuple(mask.shape[-2:]) == (ph, pw):
            return upsample_mask(mask, self.patch_size // self.stride)
        raise ValueError(f"mask of shape {tuple(mask.shape)} fits neither the final grid {h}x{w} nor the patch grid {ph}x{pw}")

    # ---- forward --------------------------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, mask)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(features)
        m = mask.unsqueeze(1).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.decoder(x))

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        mask = self.random_mask(images) if mask is None else self.to_final_grid(mask, images.shape[-2:])
        mask = mask.to(images.dtype)
        pred = self.forward_decoder(self.forward_encoder(images, mask), mask)
        loss = fcmae_loss(pred, images, mask, self.norm_pix_loss)
        return loss, pred, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images (in the input's normalisation) with masked patches replaced by the prediction,
        de-normalised with each target patch's own mean/std when norm_pix_loss is on."""
        n, _, h, w = pred.shape
        p = images.shape[-1] // w
        patches = pred.reshape(n, -1, h * w).transpose(1, 2).float()
        _, stats = patch_targets(images.float(), p, self.norm_pix_loss)
        if stats is not None:
            patches = patches * stats[1] + stats[0]
        m = mask.reshape(n, h * w, 1).float()
        merged = patchify(images.float(), p) * (1 - m) + patches * m
        return unpatchify(merged, p, h, w, images.shape[1])
