"""The Token2Wav DiT: a flow-matching transformer that turns speech codes into a mel spectrogram.

Paper: Qwen2.5-Omni section 2.4 (streaming codec decoder); the design follows F5-TTS (arXiv 2410.06885) and DiT
(arXiv 2212.09748). Reference notes 1.5 and 3f. Checkpoint prefix: `token2wav.code2wav_dit_model.`.

Flow matching in four lines. Draw noise x0 ~ N(0, I) shaped like the mel x1 we want. Put them on a straight line,
x_t = (1 - t) x0 + t x1 for t in [0, 1], whose velocity dx_t/dt = x1 - x0 is the same at every t. Train a network
v(x_t, t | codes, voice) to predict that velocity (a plain MSE). To generate, start at fresh noise and integrate
dx/dt = v(x, t) from t = 0 to t = 1 with an ODE solver; ~10 time points are enough because the paths are straight.

    codes (B, N) --codec_embed, repeat x2--> (B, T, emb)          T = repeats * N mel frames (100 per second)
    ref_mel (B, T_ref, mel) --ECAPA--> (B, enc_dim), broadcast    cond (B, enc_emb) x-vector, broadcast
    x_t (B, T, mel) ++ those three --proj--> h (B, T, d)          t --sinusoid, MLP--> t_emb (B, d)
    n_layer x block: h += g1 * Attn(AdaLN(h)); h += g2 * MLP(AdaLN(h))  (shift/scale/gate all from t_emb)
    AdaLN_final(h) --proj_out--> v (B, T, mel)

Shapes: B batch, N codes, T mel frames, d d_model, H n_head, D head_dim, mel mel_dim. x, v and mels are (B, T, mel).

Attention is local: frame i sits in block b(i) = i // block_size (24 frames = 0.24 s) and may see frame j when
-back <= b(j) - b(i) <= ahead, with (back, ahead) per layer (`DiTConfig.layer_back_ahead`). Most layers see only
their own block; the official model has two look-back layers and one look-ahead layer, so the stack sees 2 blocks
back and 1 ahead (see `receptive_field`). That bounded context is what lets streaming decode in windows with a
little past and future. It bounds one network call; an ODE solve chains 36 calls, so windowed decoding is close to
the offline result, not equal to it.

Relative to the reference (transformers' Qwen2_5OmniToken2WavDiTModel): the network, guidance, the 3/8-rule RK4 and
the sway schedule are the same. Added: batched rows of different lengths, padded on the right and described by
`code_lens` (the reference decodes one utterance at a time), and the training loss (not in the reference; the
standard conditional flow-matching loss with t ~ U(0, 1), since the official recipe is unpublished). Unlike F5-TTS,
which it follows, there is no masked mel prompt: Qwen conditions on codes and the voice only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import BlockPattern, block_attention, block_pattern
from .config import DiTConfig
from .ecapa import ECAPA
from .layers import check_finite, check_ids, check_tensor, rope_inv_freq

TIME_FREQ_DIM = 256   # width of the sinusoidal time features (checkpoint: time_mlp.0.weight is (d_model, 256))
TIME_SCALE = 1000.0   # t in [0, 1] is stretched to [0, 1000] before the sinusoid, as in diffusion models


# ----------------------------------------------------------------------------------------------------------------
# Small pieces.
# ----------------------------------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = TIME_FREQ_DIM) -> torch.Tensor:
    """t (B,) -> (B, dim) = [sin(1000 t w_k) | cos(1000 t w_k)], w_k = 10000^(-k / (dim/2 - 1)), in fp32."""
    half = dim // 2
    # angles reach 1000 rad, where one fp32 ulp of w is ~1e-4 rad: w is formed exactly as the reference forms it
    w = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    ang = TIME_SCALE * t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * w[None, :]  # (B, half)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)                    # (B, dim)


class TimestepEmbedding(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t):
        return self.time_mlp(timestep_features(t).to(self.time_mlp[0].weight.dtype))  # (B, d)


class CodecEmbedding(nn.Module):
    """codes (B, N) -> (B, N * repeats, emb_dim): one row per code, repeated so each mel frame gets its code."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.repeats = cfg.repeats
        self.codec_embed = nn.Embedding(cfg.num_embeds + 1, cfg.emb_dim)

    def forward(self, codes):
        return self.codec_embed(codes).repeat_interleave(self.repeats, dim=1)   # (B, T, emb)


class InputEmbedding(nn.Module):
    """h = proj(cat[x, ECAPA(ref_mel), code, cond]): the order of the 912 input features of the official proj."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim, cfg.d_model)
        self.spk_encoder = ECAPA(cfg)

    def features(self, ref_mel, code_emb, cond):
        """Everything except x; it does not change during sampling, so it is computed once."""
        T = code_emb.shape[1]
        spk = self.spk_encoder(ref_mel)                                 # (B, enc_dim)
        return torch.cat([spk[:, None].expand(-1, T, -1), code_emb, cond[:, None].expand(-1, T, -1)], dim=-1)

    def forward(self, x, feats):
        return self.proj(torch.cat([x, feats.to(x.dtype)], dim=-1))    # (B, T, d)


def modulate(x, shift, scale):
    """AdaLN: LayerNorm without its own weights (fp32), then a per-row scale and shift computed from t."""
    xn = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), x.shape[-1:], eps=1e-6).to(x.dtype)
    return xn * (1 + scale[:, None]) + shift[:, None]


class AdaLNZero(nn.Module):
    """SiLU(t_emb) -> Linear -> n chunks of (B, d). "Zero": the linear starts at zero (see DiT.reset_parameters),
    so every gate is 0 and every block starts as the identity."""

    def __init__(self, d_model: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(d_model, n * d_model)

    def forward(self, t_emb):
        return self.linear(F.silu(t_emb)).chunk(self.n, dim=-1)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary with *interleaved* pairs (x0, x1), (x2, x3), ...; pair k turns by angle pos * inv_freq[k].

    x (..., T, D); cos, sin (T, D/2). (layers.apply_rotary pairs (x_k, x_{k + D/2}) instead: same idea, other
    layout. The checkpoint was trained with this one, so its q/k weights only make sense with it.)
    transformers gets the same scores another way: it reorders head 0 to (x0, x2, ..., x1, x3, ...), rotates
    half-split and leaves q and k reordered; a permutation shared by q and k does not change q . k.
    """
    a, b = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2)).unbind(-1)  # (..., T, D/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)  # (..., T, D)


class DiTAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        inner = cfg.n_head * cfg.head_dim
        self.to_q = nn.Linear(cfg.d_model, inner)
        self.to_k = nn.Linear(cfg.d_model, inner)
        self.to_v = nn.Linear(cfg.d_model, inner)
        self.to_out = nn.Sequential(nn.Linear(inner, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x, pattern: BlockPattern, cos, sin):
        """Rotary is applied to head 0 ONLY. This is a quirk of the released checkpoint (the reference says it
        came from the training code and calls it a bug to fix later), and we must copy it to use the weights.

        What it means: heads 1..H-1 see no position at all; inside its allowed blocks such a head treats the
        frames as an unordered set. Order enters through head 0 alone (plus the block mask, which only tells a
        frame which block a key is in). Rotating every head would feed the other heads q/k vectors they were
        never trained on, and the official weights would produce noise.
        """
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.to_k(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = self.to_v(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        q = torch.cat([rotate_interleaved(q[:, :1], cos, sin), q[:, 1:]], dim=1)  # (B, H, T, D)
        k = torch.cat([rotate_interleaved(k[:, :1], cos, sin), k[:, 1:]], dim=1)  # (B, H, T, D)
        y = block_attention(q, k, v, pattern)                           # (B, H, T, D)
        return self.to_out(y.transpose(1, 2).reshape(B, T, -1))         # (B, T, d)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float):
        super().__init__()
        # indices match the checkpoint: ff.0 and ff.3 hold the weights
        self.ff = nn.Sequential(nn.Linear(d_model, mult * d_model), nn.GELU(approximate="tanh"),
                                nn.Dropout(dropout), nn.Linear(mult * d_model, d_model))

    def forward(self, x):
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.attn_norm = AdaLNZero(cfg.d_model, 6)   # modulation for both halves of the block
        self.attn = DiTAttention(cfg)
        self.ff = FeedForward(cfg.d_model, cfg.ff_mult, cfg.dropout)

    def forward(self, h, t_emb, pattern, cos, sin):
        # chunk order of the checkpoint: (shift, scale, gate) for attention, then the same three for the MLP
        sh1, sc1, g1, sh2, sc2, g2 = self.attn_norm(t_emb)              # 6 x (B, d)
        h = h + g1[:, None] * self.attn(modulate(h, sh1, sc1), pattern, cos, sin)
        return h + g2[:, None] * self.ff(modulate(h, sh2, sc2))


# ----------------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Conditioning:
    """What stays fixed while the ODE runs, computed once per utterance by `DiT.prepare`.

    guided=True means the batch holds [conditioned rows; unconditioned rows] (2B rows) for classifier-free guidance.
    """
    feats: torch.Tensor                 # (B', T, enc_dim + emb_dim + enc_emb_dim)  [ECAPA | code | cond] per frame
    patterns: list[BlockPattern]        # one per layer; layers with the same (back, ahead) share one object
    cos: torch.Tensor                   # (T, D/2) rotary table of head 0
    sin: torch.Tensor
    mel_valid: torch.Tensor | None      # (B', T) False at padding frames
    guided: bool


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimestepEmbedding(cfg.d_model)
        self.text_embed = CodecEmbedding(cfg)
        self.input_embed = InputEmbedding(cfg)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm_out = AdaLNZero(cfg.d_model, 2)    # NB: (scale, shift) here, the reverse of the blocks' order
        self.proj_out = nn.Linear(cfg.d_model, cfg.mel_dim)
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.reset_parameters()

    def derived_buffers(self) -> dict:
        """Buffers computed from the config, never stored in a checkpoint (rebuilt after a meta-device load)."""
        return {"inv_freq": rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta)}

    def reset_parameters(self):
        """AdaLN-Zero init (DiT paper): zero modulation and output layers, so the untrained net outputs v = 0."""
        for m in [b.attn_norm.linear for b in self.transformer_blocks] + [self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- masks and the fixed inputs ----------------------------------------------------------------------------
    def layer_patterns(self, batch: int, length: int, mel_valid=None) -> list[BlockPattern]:
        """The per-layer block patterns; the at most 3 distinct ones are built once and shared."""
        built: dict[tuple[int, int], BlockPattern] = {}
        for ba in self.cfg.layer_back_ahead:
            if ba not in built:
                built[ba] = block_pattern(batch, length, block_size=self.cfg.block_size, back=ba[0], ahead=ba[1],
                                          key_valid=mel_valid, device=self.inv_freq.device)
        return [built[ba] for ba in self.cfg.layer_back_ahead]

    def prepare(self, codes, cond, ref_mel, code_lens=None, guided: bool = False) -> Conditioning:
        """Check the inputs and compute everything that does not depend on x or t.

        Under autograd the result holds a graph (codec embedding, ECAPA): backpropagate through it once, or build it
        under torch.no_grad() to reuse it for many calls, as sampling does."""
        B, N = _check_conditioning(self.cfg, self.input_embed.spk_encoder.min_frames, codes, cond, ref_mel)
        T = N * self.cfg.repeats
        mel_valid = None
        if code_lens is not None:
            lens = _check_lens(code_lens, B, N).to(codes.device)
            mel_valid = torch.arange(T, device=codes.device)[None, :] < self.cfg.repeats * lens[:, None]  # (B, T)
        if guided:  # the unconditioned half: code index 0 everywhere, cond = 0, ref_mel = 0 (still run through ECAPA)
            codes = torch.cat([codes, torch.zeros_like(codes)])           # (2B, N)
            cond = torch.cat([cond, torch.zeros_like(cond)])              # (2B, enc_emb)
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)])     # (2B, T_ref, mel)
            mel_valid = None if mel_valid is None else torch.cat([mel_valid, mel_valid])  # (2B, T)
        feats = self.input_embed.features(ref_mel, self.text_embed(codes), cond)
        ang = torch.arange(T, device=codes.device, dtype=torch.float32)[:, None] * self.inv_freq.float()  # (T, D/2)
        return Conditioning(feats, self.layer_patterns(codes.shape[0], T, mel_valid), ang.cos(), ang.sin(),
                            mel_valid, guided)

    # -- the velocity field ------------------------------------------------------------------------------------
    def _net(self, x, t, c: Conditioning):
        h = self.input_embed(x, c.feats)                                # (B', T, d)
        t_emb = self.time_embed(t)                                      # (B', d)
        for block, pattern in zip(self.transformer_blocks, c.patterns):
            h = block(h, t_emb, pattern, c.cos, c.sin)
        scale, shift = self.norm_out(t_emb)                             # 2 x (B', d)
        v = self.proj_out(modulate(h, shift, scale))                    # (B', T, mel)
        return v if c.mel_valid is None else v * c.mel_valid[..., None]  # padding frames never move

    def velocity(self, x, t, c: Conditioning, guidance: float = 0.0):
        """The ODE right-hand side dx/dt. x (B, T, mel); t a number or a (B,) tensor.

        With guided conditioning: v = v_c + guidance * (v_c - v_u), from one pass over the doubled batch.
        """
        B = c.feats.shape[0] // (2 if c.guided else 1)
        check_tensor("x", x, 3, last=self.cfg.mel_dim)
        if tuple(x.shape[:2]) != (B, c.feats.shape[1]):
            raise ValueError(f"x must have shape {(B, c.feats.shape[1], self.cfg.mel_dim)}, got {tuple(x.shape)}")
        t = _time(t, B, x)
        if not c.guided:
            if guidance:
                raise ValueError(f"guidance={guidance} needs conditioning built with prepare(..., guided=True)")
            return self._net(x, t, c)
        v_c, v_u = self._net(torch.cat([x, x]), torch.cat([t, t]), c).chunk(2)  # 2 x (B, T, mel)
        return v_c + guidance * (v_c - v_u)

    def forward(self, x, t, codes, cond, ref_mel, code_lens=None):
        """The conditional velocity (no guidance): what training fits."""
        return self.velocity(x, t, self.prepare(codes, cond, ref_mel, code_lens))

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def trajectory(self, codes, cond, ref_mel, steps: int = 10, guidance: float = 0.5, sway: float | None = -1.0,
                   solver: str = "rk4", noise=None, code_lens=None, generator=None):
        """Integrate from noise (t = 0) to a mel (t = 1). Returns (ts (steps,), states (steps, B, T, mel)).

        noise (B, T, mel) is the starting point; pass it to make runs reproducible or, when streaming, to draw the
        noise of a whole utterance once and hand each window its slice. Otherwise it is drawn with `generator`.
        """
        if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
        c = self.prepare(codes, cond, ref_mel, code_lens, guided=guidance > 0)
        B, T, M = codes.shape[0], c.feats.shape[1], self.cfg.mel_dim
        if noise is None:
            noise = _draw(torch.randn, (B, T, M), generator, ref_mel)
        check_tensor("noise", noise, 3, last=M)
        if noise.shape[:2] != (B, T):
            raise ValueError(f"noise must have shape {(B, T, M)} (T = repeats * codes), got {tuple(noise.shape)}")
        check_finite("noise", noise)
        ts = sway_schedule(steps, sway, device=noise.device)
        return ts, integrate(lambda t, x: self.velocity(x, t, c, guidance), noise, ts, solver)

    def sample(self, codes, cond, ref_mel, steps: int = 10, guidance: float = 0.5, sway: float | None = -1.0,
               solver: str = "rk4", noise=None, code_lens=None, generator=None) -> torch.Tensor:
        """codes (B, N), cond (B, enc_emb_dim), ref_mel (B, T_ref, mel) -> mel (B, T = repeats * N, mel_dim).

        Defaults are the official ones. The reference returns (B, mel, T); transpose for the vocoder.
        """
        return self.trajectory(codes, cond, ref_mel, steps, guidance, sway, solver, noise, code_lens, generator)[1][-1]


# ----------------------------------------------------------------------------------------------------------------
# Training: conditional flow matching on straight paths.
# ----------------------------------------------------------------------------------------------------------------
def flow_matching_loss(dit: DiT, mel, codes, cond, ref_mel, code_lens=None, *, t=None, noise=None,
                       drop_prob: float = 0.0, generator=None) -> torch.Tensor:
    """MSE between v(x_t, t) and the path velocity x1 - x0, averaged over real (non-padding) frames.

    mel (B, T, mel) is the data x1; noise x0 and t ~ U(0, 1) per row are drawn unless given. With drop_prob > 0,
    each row loses all its conditions with that probability (codes -> 0, cond -> 0, ref_mel -> 0, exactly the
    unconditioned half used by guidance at sampling time), so one network learns both v_c and v_u.
    """
    check_ids("codes", codes, dit.cfg.num_embeds + 1)
    check_tensor("mel", mel, 3, last=dit.cfg.mel_dim)
    check_finite("mel", mel)
    B, T = codes.shape[0], codes.shape[1] * dit.cfg.repeats
    if mel.shape[:2] != (B, T):
        raise ValueError(f"mel must have shape {(B, T, dit.cfg.mel_dim)} (T = repeats * codes), got {tuple(mel.shape)}")
    x1 = mel
    x0 = _draw(torch.randn, x1.shape, generator, x1) if noise is None else noise
    t = _draw(torch.rand, (B,), generator, x1) if t is None else _time(t, B, x1)
    if drop_prob > 0:
        keep = _draw(torch.rand, (B,), generator, x1) >= drop_prob   # (B,)
        codes, cond = codes * keep[:, None], cond * keep[:, None]
        ref_mel = ref_mel * keep[:, None, None]
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1           # a point on the straight path
    err = (dit(x_t, t, codes, cond, ref_mel, code_lens) - (x1 - x0)).pow(2)  # (B, T, mel)
    if code_lens is None:
        return err.mean()
    valid = (torch.arange(T, device=x1.device)[None, :] < dit.cfg.repeats * _check_lens(code_lens, B, codes.shape[1])
             .to(x1.device)[:, None])                                    # (B, T)
    return (err * valid[..., None]).sum() / (valid.sum() * dit.cfg.mel_dim)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: a time grid and two ODE solvers, written out.
# ----------------------------------------------------------------------------------------------------------------
def sway_schedule(steps: int, sway: float | None = -1.0, device=None) -> torch.Tensor:
    """`steps` time points from 0 to 1: t + sway * (cos(pi t / 2) - 1 + t) on an even grid (F5-TTS).

    Negative sway packs the points near t = 0, where the noisy input says least and the velocity changes most;
    sway = -1 gives 1 - cos(pi t / 2). The end points stay at 0 and 1 for any sway.

    >>> [round(x, 3) for x in sway_schedule(5).tolist()]
    [0.0, 0.076, 0.293, 0.617, 1.0]
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (time points from 0 to 1), got {steps!r}")
    if sway is not None and (not isinstance(sway, (int, float)) or not math.isfinite(sway)):
        raise ValueError(f"sway must be a finite number or None, got {sway!r}")
    t = torch.linspace(0, 1, steps, device=device, dtype=torch.float32)
    return t if sway is None else t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)


def euler_step(f: Callable, t0, t1, y):
    """First order: follow the slope at the start for the whole step. 1 evaluation of f."""
    return y + (t1 - t0) * f(t0, y)


def rk4_step(f: Callable, t0, t1, y):
    """Fourth order, Kutta's 3/8 rule (torchdiffeq's "rk4", used by the reference). 4 evaluations of f.

    Slopes at t0, t0 + h/3, t0 + 2h/3 and t1, each probing from a better estimate, weighted 1, 3, 3, 1 (/ 8).
    """
    h = t1 - t0
    k1 = f(t0, y)
    k2 = f(t0 + h / 3, y + h * k1 / 3)
    k3 = f(t0 + 2 * h / 3, y + h * (k2 - k1 / 3))
    k4 = f(t1, y + h * (k1 - k2 + k3))
    return y + h * (k1 + 3 * (k2 + k3) + k4) / 8


SOLVERS = {"euler": euler_step, "rk4": rk4_step}


def integrate(f: Callable, y0: torch.Tensor, ts: torch.Tensor, solver: str = "rk4") -> torch.Tensor:
    """Solve dy/dt = f(t, y) from y(ts[0]) = y0; returns y at every time point, (len(ts), *y0.shape)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    ys = [y0]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        ys.append(SOLVERS[solver](f, t0, t1, ys[-1]))
    return torch.stack(ys)


def receptive_field(cfg: DiTConfig, length: int) -> torch.Tensor:
    """(length, length) bool: R[i, j] is True when input frame j can influence output frame i.

    Layer l mixes frame j into frame i when its mask M_l allows it (M_l includes i itself, the residual path), so
    the stack's dependency is the boolean product M_{L-1} ... M_1 M_0.
    """
    R = torch.eye(length, dtype=torch.bool)
    for back, ahead in cfg.layer_back_ahead:
        M = block_pattern(1, length, block_size=cfg.block_size, back=back, ahead=ahead).dense_mask()[0, 0]  # (T, T)
        R = (M.float() @ R.float()) > 0
    return R


# ----------------------------------------------------------------------------------------------------------------
# Boundary checks.
# ----------------------------------------------------------------------------------------------------------------
def _check_conditioning(cfg: DiTConfig, min_frames: int, codes, cond, ref_mel) -> tuple[int, int]:
    check_ids("codes", codes, cfg.num_embeds + 1)   # the table has num_embeds + 1 rows: ids 0 .. num_embeds
    B, N = codes.shape
    if B == 0 or N == 0:
        raise ValueError(f"codes must hold at least one code per row, got shape {tuple(codes.shape)}")
    if N * cfg.repeats > cfg.max_mel_len:
        raise ValueError(f"{N} codes make {N * cfg.repeats} mel frames, more than max_mel_len ({cfg.max_mel_len}); "
                         f"decode in windows")
    check_tensor("cond", cond, 2, last=cfg.enc_emb_dim)
    check_tensor("ref_mel", ref_mel, 3, last=cfg.mel_dim)
    if cond.shape[0] != B or ref_mel.shape[0] != B:
        raise ValueError(f"cond {tuple(cond.shape)} and ref_mel {tuple(ref_mel.shape)} must have batch size {B} "
                         f"like codes")
    if ref_mel.shape[1] < min_frames:
        raise ValueError(f"ref_mel must have at least {min_frames} frames (the ECAPA reflect padding), "
                         f"got {ref_mel.shape[1]}")
    check_finite("cond", cond)
    check_finite("ref_mel", ref_mel)
    return B, N


def _check_lens(code_lens, B: int, N: int) -> torch.Tensor:
    lens = torch.as_tensor(code_lens)
    if lens.shape != (B,) or lens.is_floating_point() or lens.dtype == torch.bool:
        raise ValueError(f"code_lens must be {B} integers (one per row), got {code_lens!r}")
    if bool((lens < 1).any()) or bool((lens > N).any()):
        raise ValueError(f"code_lens must lie in [1, {N}] (the padded code length), got {lens.tolist()}")
    return lens


def _draw(fn, shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """torch.randn / torch.rand of `shape`, drawn where the generator lives (a CPU generator can drive a CUDA run:
    the same seed gives the same numbers on every device), returned on like's device and dtype."""
    where = generator.device if generator is not None else like.device
    return fn(shape, generator=generator, device=where).to(like.device, like.dtype)


def _time(t, B: int, like: torch.Tensor) -> torch.Tensor:
    """A number, a 0-d tensor or a (B,) tensor -> (B,) tensor."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must be a number or a tensor of shape ({B},), got shape {tuple(t.shape)}")
    return t


__all__ = ["DiT", "Conditioning", "flow_matching_loss", "sway_schedule", "euler_step", "rk4_step", "integrate",
           "receptive_field", "rotate_interleaved", "timestep_features"]
