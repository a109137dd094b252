"""ECAPA-TDNN: the speaker encoder inside the Token2Wav DiT. It turns a reference mel into one voice vector.

Paper: Desplanques et al., "ECAPA-TDNN: Emphasized Channel Attention, Propagation and Aggregation in TDNN Based
Speaker Verification" (arXiv 2005.07143). Qwen2.5-Omni uses it at `token2wav.code2wav_dit_model.input_embed.
spk_encoder` (reference 3f "ECAPA-TDNN"); its output is broadcast over time and concatenated to the DiT input.

    ref_mel (B, T, mel) -> (B, mel, T) -> TDNN k5 -> 3 x SE-Res2Net (dilations 2, 3, 4)
        -> MFA: TDNN k1 over cat(the three block outputs) -> attentive statistics pooling -> fc -> (B, enc_dim)

Shapes: B batch, T reference frames, C channels. Every module here works on (B, C, T), the Conv1d layout.
A "TDNN" (time-delay neural network layer) is just a 1-D convolution followed by ReLU.

Every convolution pads "same" with *reflect* padding (the mirror image of the edge frames, not zeros), as the
checkpoint was trained. Reflect padding needs the input to be longer than the padding, so the reference mel must
have at least `ECAPA.min_frames` frames (5 for the official kernel/dilation list).

Simplifications: every reference mel in a batch has the same length (the official voices are (1, 400, 80)), so the
pooling has no length mask. Module names equal the checkpoint keys (`blocks.1.res2net_block.blocks.0.conv`, ...).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import DiTConfig


def _conv(c_in: int, c_out: int, kernel: int = 1, dilation: int = 1) -> nn.Conv1d:
    # "same" length out, with the edges mirrored: padding_mode="reflect" pads with x[1], x[2], ... not zeros
    return nn.Conv1d(c_in, c_out, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TDNN(nn.Module):
    """Conv1d + ReLU. (B, C_in, T) -> (B, C_out, T)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1):
        super().__init__()
        self.conv = _conv(c_in, c_out, kernel, dilation)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Res2Net(nn.Module):
    """Split the channels into `scale` groups; group 0 passes through, group i > 0 is convolved after adding the
    previous group's output. Later groups therefore see a growing receptive field (a multi-scale block in one
    layer). With the official scale 2 there is a single TDNN on the second half of the channels."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList([TDNN(width, width, kernel, dilation) for _ in range(scale - 1)])

    def forward(self, x):
        parts = x.chunk(self.scale, dim=1)                              # scale x (B, C / scale, T)
        out = [parts[0]]
        y = None
        for i, block in enumerate(self.blocks, start=1):
            y = block(parts[i] if y is None else parts[i] + y)
            out.append(y)
        return torch.cat(out, dim=1)                                    # (B, C, T)


class SqueezeExcite(nn.Module):
    """Channel attention: average over time, a bottleneck MLP (as two k=1 convs) and a sigmoid gate per channel."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = _conv(channels, se_channels)
        self.conv2 = _conv(se_channels, channels)

    def forward(self, x):
        s = x.mean(dim=2, keepdim=True)                                 # (B, C, 1)
        s = torch.sigmoid(self.conv2(torch.relu(self.conv1(s))))        # (B, C, 1)
        return x * s


class SERes2NetBlock(nn.Module):
    """TDNN k1 -> Res2Net (the dilated conv) -> TDNN k1 -> squeeze-excite, plus a residual connection."""

    def __init__(self, c_in: int, c_out: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNN(c_in, c_out, 1)
        self.res2net_block = Res2Net(c_out, scale, kernel, dilation)
        self.tdnn2 = TDNN(c_out, c_out, 1)
        self.se_block = SqueezeExcite(c_out, se_channels)

    def forward(self, x):
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


class AttentiveStatsPool(nn.Module):
    """Pool (B, C, T) to (B, 2C): an attention-weighted mean and standard deviation per channel.

    The attention logits of every channel and frame come from a small conv net that sees the frame itself and the
    plain (unweighted) mean and std of the whole utterance, so a frame is scored relative to the global statistics.
    """

    eps = 1e-12  # floor of the variance before the square root (the reference clamps at 1e-12)

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNN(3 * channels, attention_channels, 1)
        self.conv = _conv(attention_channels, channels)

    def _stats(self, x, w):
        """Weighted mean and std over time; w (B, C|1, T) sums to 1 over T."""
        mean = (w * x).sum(dim=2)                                       # (B, C)
        var = (w * (x - mean[:, :, None]).pow(2)).sum(dim=2)            # (B, C)
        return mean, var.clamp(min=self.eps).sqrt()

    def forward(self, x):
        T = x.shape[2]
        mean, std = self._stats(x, x.new_full((1, 1, T), 1.0 / T))      # uniform weights: the plain statistics
        glob = torch.cat([x, mean[:, :, None].expand_as(x), std[:, :, None].expand_as(x)], dim=1)  # (B, 3C, T)
        logits = self.conv(torch.tanh(self.tdnn(glob)))                 # (B, C, T)
        w = logits.softmax(dim=2)                                       # one distribution over time per channel
        mean, std = self._stats(x, w)
        return torch.cat([mean, std], dim=1)                            # (B, 2C)


class ECAPA(nn.Module):
    """ref_mel (B, T, mel_dim) -> speaker vector (B, enc_dim)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        ch, ks, ds = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, ch[0], ks[0], ds[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels,
                                              ks[i], ds[i]))
        # multi-layer feature aggregation: the SE-Res2Net outputs side by side (their widths must sum to ch[-1])
        self.mfa = TDNN(sum(ch[1:-1]), ch[-1], ks[-1], ds[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = _conv(2 * ch[-1], cfg.enc_dim)
        # reflect padding of p frames needs more than p frames; the right side gets the larger half
        self.min_frames = 1 + max(d * (k - 1) - d * (k - 1) // 2 for k, d in zip(ks, ds))

    def forward(self, ref_mel: torch.Tensor) -> torch.Tensor:
        x = ref_mel.transpose(1, 2)                                     # (B, mel, T)
        feats = []
        for block in self.blocks:
            x = block(x)                                                # (B, C_i, T)
            feats.append(x)
        x = self.mfa(torch.cat(feats[1:], dim=1))                       # (B, C_last, T); the stem is left out
        x = self.asp(x)                                                 # (B, 2 C_last)
        return self.fc(x[:, :, None])[:, :, 0]                          # (B, enc_dim)


__all__ = ["ECAPA", "TDNN", "Res2Net", "SqueezeExcite", "SERes2NetBlock", "AttentiveStatsPool"]
