"""The speech tokenizer of the tiny models: waveform -> mel -> 50 discrete codes per second.

The official tokenizer (qwen-tts-tokenizer, paper section 2.3) is not released. This is the simplest stand-in
that serves the same role: the Talker predicts its codes, the DiT turns them back into a mel.

    wav (24 kHz) --mel.mel_spectrogram--> (T, 80) log mel, 100 frames/s
                 --pairs of frames--> (T/2, 160) vectors, 50 per second (20 ms each, as the official codes)
                 --nearest of K centroids--> codes (T/2,) in [0, K)

The centroids come from k-means (Lloyd's algorithm) on the training speech, with a seeded k-means++ start, so
fitting is deterministic. Decoding a code back to its centroid gives a blurry mel: recovering detail (and the
voice) is the DiT's job. Being a plain vector quantiser of the spectrum, the codes carry both what is said and
who says it, unlike the official tokenizer; for a toy with four voices that is fine.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes
from .config import VocoderConfig
from .mel import mel_spectrogram


class SpeechCodec:
    def __init__(self, centroids: torch.Tensor, frames_per_code: int = 2, vocoder: VocoderConfig | None = None):
        if centroids.ndim != 2:
            raise ValueError(f"centroids must be (K, frames_per_code * mel_dim), got {tuple(centroids.shape)}")
        self.centroids = centroids.float()
        self.frames_per_code = frames_per_code
        self.vocoder = vocoder or VocoderConfig()
        if centroids.shape[1] != frames_per_code * self.vocoder.mel_dim:
            raise ValueError(f"centroids have width {centroids.shape[1]}, expected frames_per_code * mel_dim = "
                             f"{frames_per_code * self.vocoder.mel_dim}")

    @property
    def n_codes(self) -> int:
        return self.centroids.shape[0]

    # -- features ----------------------------------------------------------------------------------------------
    def mel(self, wav: torch.Tensor) -> torch.Tensor:
        """(n,) waveform at the vocoder's rate -> (T, mel_dim) log mel, T = n // hop."""
        return mel_spectrogram(wav.reshape(1, -1).float(), self.vocoder)[0].T

    def _pairs(self, mel: torch.Tensor) -> torch.Tensor:
        f = self.frames_per_code
        n = mel.shape[0] // f
        return mel[: n * f].reshape(n, f * mel.shape[1])                         # (T/f, f * mel)

    # -- fitting -----------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, mels: list[torch.Tensor], n_codes: int, *, frames_per_code: int = 2, iters: int = 30, seed: int = 0,
            vocoder: VocoderConfig | None = None) -> "SpeechCodec":
        """k-means on the frame pairs of `mels` (each (T, mel_dim)). Deterministic for a given seed."""
        proto = cls(torch.zeros(n_codes, frames_per_code * mels[0].shape[1]), frames_per_code, vocoder)
        x = torch.cat([proto._pairs(m.float()) for m in mels])                    # (M, D)
        if x.shape[0] < n_codes:
            raise ValueError(f"k-means needs at least {n_codes} frame pairs, got {x.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        c = _kmeans_pp(x, n_codes, g)
        for _ in range(iters):
            assign = torch.cdist(x, c).argmin(1)                                  # (M,)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=n_codes).float()[:, None]
            empty = counts[:, 0] == 0
            c = torch.where(empty[:, None], c, sums / counts.clamp(min=1))        # an empty cluster keeps its centre
        return cls(c, frames_per_code, vocoder)

    # -- use ---------------------------------------------------------------------------------------------------
    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """(T, mel_dim) -> codes (T // frames_per_code,) long."""
        if mel.ndim != 2 or mel.shape[1] != self.vocoder.mel_dim:
            raise ValueError(f"mel must have shape (T, {self.vocoder.mel_dim}), got {tuple(mel.shape)}")
        return torch.cdist(self._pairs(mel.float()), self.centroids).argmin(1)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """(n,) waveform at the vocoder's rate -> codes, 50 per second."""
        return self.encode_mel(self.mel(wav))

    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N,) -> (N * frames_per_code, mel_dim): each code's centroid, unfolded into frames."""
        if codes.ndim != 1 or (codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_codes)):
            raise ValueError(f"codes must be a 1-D tensor of ids in [0, {self.n_codes})")
        return self.centroids[codes].reshape(-1, self.vocoder.mel_dim)

    # -- files -------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save

        # one metadata key: safetensors writes several in an order that changes from process to process, and the
        # same codec should be the same bytes
        meta = {"codec": json.dumps({"frames_per_code": self.frames_per_code, "vocoder": self.vocoder.__dict__},
                                    sort_keys=True)}
        atomic_write_bytes(path, save({"centroids": self.centroids.contiguous()}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "SpeechCodec":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"codec file {path} does not exist")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                c = f.get_tensor("centroids")
            if "codec" in meta:
                meta = json.loads(meta["codec"])
            else:           # files written before the single key: two keys, the vocoder as a JSON string
                meta = {"frames_per_code": meta["frames_per_code"], "vocoder": json.loads(meta["vocoder"])}
            return cls(c, int(meta["frames_per_code"]), VocoderConfig(**meta["vocoder"]))
        except Exception as e:   # safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a valid codec file: {e}") from None


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ start: each new centre is drawn with probability proportional to its squared distance from the
    nearest centre so far (spreads the centres over the data)."""
    centres = [x[torch.randint(x.shape[0], (1,), generator=g)].squeeze(0)]
    d2 = torch.cdist(x, centres[0][None]).squeeze(1) ** 2
    for _ in range(1, k):
        i = torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2), 1, generator=g)
        centres.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, torch.cdist(x, x[i]).squeeze(1) ** 2)
    return torch.stack(centres)
