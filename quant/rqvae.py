"""RQ-VAE (TIGER / semantic-ID style) in torch: encoder MLP -> residual codebooks -> decoder MLP.

Training: reconstruction + codebook + commitment losses; gradients cross the quantizer by the straight-through
estimator or the rotation trick (Fifty et al., 2024); codebooks start from residual k-means on the first latents
and dead codes are re-seeded from live residuals during training.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from quant import kmeans
from quant.base import Quantizer, check_codes, check_embeddings, register
from quant.rq_kmeans import RQKMeans, residual_encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RQVAEConfig:
    """Settings of an RQ-VAE.

    Args:
        levels: residual codebook levels L.
        codebook_size: codes per level K.
        latent_dim: width of the quantized latent.
        hidden_dims: encoder hidden widths (the decoder mirrors them).
        epochs, batch_size, lr, weight_decay: Adam training.
        beta: commitment loss weight.
        gradient: 'rotation' (rotation trick) or 'ste' (straight-through estimator).
        kmeans_init: initialise codebooks by residual k-means on the first latents.
        reset_every: check for dead codes every this many steps (0: never).
        dead_threshold: a code used fewer times than this since the last check is re-seeded.
        seed: seeds weights, shuffling and resets.
        device: 'auto', 'cpu' or 'cuda'.
        log_every: log progress every this many epochs.
    """

    levels: int = 3
    codebook_size: int = 256
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (256, 128)
    epochs: int = 50
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta: float = 0.25
    gradient: str = "rotation"
    kmeans_init: bool = True
    reset_every: int = 50
    dead_threshold: int = 1
    seed: int = 0
    device: str = "auto"
    log_every: int = 10

    def __post_init__(self):
        for name in ("levels", "codebook_size", "latent_dim", "epochs", "batch_size", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if any(int(h) < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive, got {self.hidden_dims!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.beta < 0:
            raise ValueError("weight_decay and beta must be >= 0")
        if self.gradient not in ("rotation", "ste"):
            raise ValueError(f"gradient must be 'rotation' or 'ste', got {self.gradient!r}")
        if self.reset_every < 0 or self.dead_threshold < 0:
            raise ValueError("reset_every and dead_threshold must be >= 0")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {self.device!r}")


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def rotation_trick(e: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Forward value q, gradient through e by the fixed rotation + scaling that maps e onto q.

    With e_hat, q_hat unit vectors and r = (e_hat + q_hat)/|e_hat + q_hat|, R = I - 2 r r^T + 2 q_hat e_hat^T
    rotates e_hat onto q_hat; the output is (|q| / |e|) R e with R and the scale treated as constants.

    Args:
        e: (B, m) encoder residual (requires grad).
        q: (B, m) chosen codewords (detached).
    """
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)  # (B, 1)
    q_norm = q.norm(dim=-1, keepdim=True).clamp_min(eps)
    e_hat = (e / e_norm).detach()
    q_hat = (q / q_norm).detach()
    r = e_hat + q_hat
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
    rotated = e - 2 * r * (r * e).sum(-1, keepdim=True) + 2 * q_hat * (e_hat * e).sum(-1, keepdim=True)
    return rotated * (q_norm / e_norm).detach()


class RQVAEModel(nn.Module):
    """Encoder -> L residual codebooks (L, K, m) -> decoder."""

    def __init__(self, dim: int, cfg: RQVAEConfig):
        super().__init__()
        widths = [dim, *[int(h) for h in cfg.hidden_dims], cfg.latent_dim]
        self.encoder = _mlp(widths)
        self.decoder = _mlp(widths[::-1])
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.1)
        self.gradient = cfg.gradient

    @staticmethod
    def nearest(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """(B, m), (K, m) -> (B,) index of the nearest codeword (one GEMM)."""
        scores = torch.addmm(-0.5 * (codebook * codebook).sum(1), residual, codebook.t())  # (B, K)
        return scores.argmax(dim=1)

    def quantize(self, z: torch.Tensor):
        """z (B, m) -> (z_q (B, m) carrying gradients to z, codes (B, L), codebook loss, commitment loss,
        per-level residuals before quantization)."""
        residual = z
        parts, codes, residuals = [], [], []
        cb_loss = z.new_zeros(())
        commit_loss = z.new_zeros(())
        for level in range(self.codebooks.shape[0]):
            book = self.codebooks[level]
            idx = self.nearest(residual.detach(), book.detach())
            q = book[idx]  # (B, m), grad flows to the codebook
            cb_loss = cb_loss + (q - residual.detach()).pow(2).sum(-1).mean()
            commit_loss = commit_loss + (residual - q.detach()).pow(2).sum(-1).mean()
            if self.gradient == "rotation":
                parts.append(rotation_trick(residual, q.detach()))
            else:
                parts.append(q.detach())
            residuals.append(residual.detach())
            codes.append(idx)
            residual = residual - q.detach()
        quantized = torch.stack(parts).sum(0)
        if self.gradient == "ste":
            quantized = z + (quantized - z).detach()
        return quantized, torch.stack(codes, dim=1), cb_loss, commit_loss, residuals

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        z_q, codes, cb_loss, commit_loss, residuals = self.quantize(z)
        return self.decoder(z_q), codes, cb_loss, commit_loss, residuals


@register
class RQVAE(Quantizer):
    """RQ-VAE quantizer: ``fit`` trains the autoencoder; ``encode`` (N, d) -> (N, L) int32; ``decode`` -> (N, d)."""

    method = "rq-vae"

    def __init__(self, levels: int = 3, codebook_size: int = 256, seed: int = 0, *,
                 config: RQVAEConfig | None = None, **settings):
        super().__init__(config or RQVAEConfig(levels=levels, codebook_size=codebook_size, seed=seed, **settings))
        self.model: RQVAEModel | None = None
        self.dim: int | None = None

    @classmethod
    def config_class(cls):
        return RQVAEConfig

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    @property
    def codebooks(self) -> list[np.ndarray]:
        """Latent-space codebooks, L arrays of (K, latent_dim)."""
        self._require_fitted()
        return [c.detach().cpu().numpy().copy() for c in self.model.codebooks]

    def _kmeans_init(self, model: RQVAEModel, x: torch.Tensor, device: str) -> None:
        cfg = self.config
        with torch.no_grad():
            z = model.encoder(x).cpu().numpy()
        rq = RQKMeans(levels=cfg.levels, codebook_size=cfg.codebook_size, seed=cfg.seed, niter=10,
                      refine_iter=0, device="cpu").fit(z)
        with torch.no_grad():
            model.codebooks.copy_(torch.from_numpy(np.stack(rq.codebooks)).to(device))

    def _reset_dead(self, model, usage: torch.Tensor, residuals: list[torch.Tensor], gen: torch.Generator,
                    optimizer) -> int:
        """Re-seed codes used fewer than dead_threshold times since the last check from batch residuals."""
        n_reset = 0
        with torch.no_grad():
            for level, res in enumerate(residuals):
                dead = torch.nonzero(usage[level] < self.config.dead_threshold).flatten()
                if dead.numel() == 0:
                    continue
                pick = torch.randint(0, res.shape[0], (dead.numel(),), generator=gen).to(res.device)
                model.codebooks[level, dead] = res[pick]
                state = optimizer.state.get(model.codebooks, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][level, dead] = 0
                n_reset += int(dead.numel())
        usage.zero_()
        return n_reset

    def fit(self, x) -> "RQVAE":
        """Train on (N, d) embeddings. Returns self; ``fit_stats['history']`` holds the per-epoch losses."""
        cfg = self.config
        x = check_embeddings(x, min_rows=cfg.codebook_size,
                             min_rows_reason=f" (one per code: codebook_size {cfg.codebook_size})")
        device = kmeans.resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.dim = x.shape[1]
        model = RQVAEModel(self.dim, cfg).to(device)
        data = torch.from_numpy(x).to(device)
        variance = float(((x - x.mean(0)) ** 2).sum(1).mean()) or 1.0
        if cfg.kmeans_init:
            self._kmeans_init(model, data[torch.randperm(len(data), generator=gen)[: max(cfg.batch_size * 4,
                                                                                           cfg.codebook_size)]],
                              device)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        usage = torch.zeros(cfg.levels, cfg.codebook_size, device=device)
        history, step, total_resets = [], 0, 0
        t0 = time.perf_counter()
        n_batches = math.ceil(len(data) / cfg.batch_size)
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            order = torch.randperm(len(data), generator=gen).to(device)
            sums = {"loss": 0.0, "recon": 0.0, "codebook": 0.0, "commit": 0.0}
            epoch_resets = 0
            for b in range(n_batches):
                batch = data[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                x_hat, codes, cb_loss, commit_loss, residuals = model(batch)
                recon = (x_hat - batch).pow(2).sum(-1).mean() / variance
                loss = recon + cb_loss + cfg.beta * commit_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                for level in range(cfg.levels):
                    usage[level] += torch.bincount(codes[:, level], minlength=cfg.codebook_size)
                if cfg.reset_every and step % cfg.reset_every == 0:
                    epoch_resets += self._reset_dead(model, usage, residuals, gen, optimizer)
                for key, value in zip(sums, (loss, recon, cb_loss, commit_loss)):
                    sums[key] += float(value.detach()) * len(batch)
            record = {k: v / len(data) for k, v in sums.items()}
            record.update(epoch=epoch, resets=epoch_resets)
            history.append(record)
            total_resets += epoch_resets
            if epoch % cfg.log_every == 0 or epoch in (1, cfg.epochs):
                log.info("rq-vae epoch %d/%d: loss %.4f recon(rel) %.4f codebook %.4f commit %.4f, %d dead codes "
                         "reset, %.1fs", epoch, cfg.epochs, record["loss"], record["recon"], record["codebook"],
                         record["commit"], epoch_resets, time.perf_counter() - t0)
        model.eval()
        self.model = model
        self.fit_stats = {"n_rows": int(x.shape[0]), "device": device, "steps": step, "resets": total_resets,
                          "seconds": round(time.perf_counter() - t0, 4), "history": history}
        return self

    def _latents(self, x: np.ndarray, batch: int = 65536) -> np.ndarray:
        device = next(self.model.parameters()).device
        out = []
        with torch.no_grad():
            for start in range(0, len(x), batch):
                out.append(self.model.encoder(torch.from_numpy(x[start:start + batch]).to(device)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def encode(self, x) -> np.ndarray:
        """(N, d) -> (N, L) int32 codes (residual nearest-codeword search on the encoder's latents)."""
        self._require_fitted()
        x = check_embeddings(x, dim=self.dim)
        device = str(next(self.model.parameters()).device)
        return residual_encode(self._latents(x), self.codebooks, device=device)

    def decode(self, codes) -> np.ndarray:
        """(N, L) -> (N, d) float32: decoder(sum of the chosen codewords)."""
        self._require_fitted()
        cfg = self.config
        codes = check_codes(codes, levels=cfg.levels, codebook_sizes=[cfg.codebook_size] * cfg.levels)
        books = self.model.codebooks.detach()
        idx = torch.from_numpy(np.array(codes)).to(books.device)
        with torch.no_grad():
            z_q = sum(books[level][idx[:, level]] for level in range(cfg.levels))
            return self.model.decoder(z_q).cpu().numpy().astype(np.float32)

    def _extra(self) -> dict:
        return {"fit_stats": self.fit_stats, "dim": self.dim}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}

    def _restore(self, arrays: dict[str, np.ndarray], extra: dict) -> None:
        if "dim" not in extra:
            raise ValueError("saved rq-vae has no 'dim' in quantizer.json extra")
        self.dim = int(extra["dim"])
        model = RQVAEModel(self.dim, self.config)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        model.to(kmeans.resolve_device(self.config.device)).eval()
        self.model = model
