"""Analytic FLOPs of a training step and MFU against a peak table.

Model FLOPs count what one token needs (one expert per token, the ViT for ViT tokens, the
heads, attention); MFU uses them. Executed FLOPs add what this implementation also spends:
the dense router runs both experts' block matmuls on every token. Training = 3 x forward
(remat recomputation is not model work and is not counted).
"""

from __future__ import annotations

import dataclasses

from strokes_jax.model.unified import ModelConfig

# Dense bf16 peak per chip, TFLOP/s (vendor data sheets; H100/H200 SXM without sparsity).
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,
    "tpu v6 lite": 918.0,  # v6e (Trillium)
    "tpu v6e": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
    """Peak for a jax Device.device_kind, or None (e.g. CPU) when the table has no entry."""
    kind = device_kind.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_TFLOPS[key]
    return None


@dataclasses.dataclass(frozen=True)
class StepFlops:
    model: float  # per training step, whole global batch
    executed: float

    def per_device(self, n: int) -> "StepFlops":
        return StepFlops(self.model / n, self.executed / n)


def block_matmul_flops_per_token(cfg: ModelConfig) -> float:
    d = cfg.decoder
    qkv = d.width * (d.heads + 2 * d.kv_heads) * d.head_dim
    o = d.heads * d.head_dim * d.width
    mlp = 3 * d.width * d.mlp
    return 2.0 * d.depth * (qkv + o + mlp)


def _parts(cfg: ModelConfig, batch: int, seq_len: int, vit_tokens: int = 0) -> dict[str, float]:
    """Forward FLOPs by part, for `batch` rows of `seq_len` positions."""
    d = cfg.decoder
    tokens = batch * seq_len
    vit = 0.0
    if cfg.vision is not None and vit_tokens:
        v = cfg.vision
        per_layer = 4 * v.width * v.width + 2 * v.width * v.mlp
        vit = 2.0 * vit_tokens * (v.depth * per_layer + v.patch * v.patch * v.channels * v.width
                                  + v.width * d.width + d.width * d.width)
    return {
        "blocks": block_matmul_flops_per_token(cfg) * tokens,
        # Dense attention over the whole row: QK^T and AV, every layer.
        "attention": 2.0 * 2.0 * d.depth * batch * seq_len * seq_len * d.heads * d.head_dim,
        "heads": 2.0 * tokens * d.width * (cfg.vocab_size + cfg.patch_dim),  # lm_head + llm2vae
        "inputs": 2.0 * tokens * (d.width * cfg.patch_dim + 256 * d.width + d.width * d.width),
        "vit": vit,
    }


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int, vit_tokens: int = 0) -> StepFlops:
    """Forward FLOPs for `batch` rows of `seq_len` positions (vit_tokens ViT positions in all)."""
    p = _parts(cfg, batch, seq_len, vit_tokens)
    model = sum(p.values())
    return StepFlops(model=model, executed=model + p["blocks"])


def train_step_flops(cfg: ModelConfig, batch: int, seq_len: int, vit_tokens: int = 0) -> StepFlops:
    f = forward_flops(cfg, batch, seq_len, vit_tokens)
    return StepFlops(3.0 * f.model, 3.0 * f.executed)


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled (jax `Compiled`) per-device program; None where the
    backend offers no cost analysis. A scanned loop's body is counted once."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (an analysis some backends do not offer)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    flops = (ca or {}).get("flops")
    return float(flops) if flops else None


def conventions(cfg: ModelConfig, batch: int, seq_len: int, *, visible_pairs: int,
                text_targets: int, noisy_tokens: int, vit_tokens: int = 0) -> dict[str, float]:
    """Training-step model FLOPs in three conventions, so a reader can compare with any peer:
      ours     every (query, key) pair of the row attended, both heads on every token
      maxtext  MaxText's: attention halved, as for a causal mask
      needed   what the mask and the data need: the (query, key) pairs the mask keeps, the
               lm_head on tokens with a text target, the velocity head on noisy tokens.
    All count one expert per token (the MoT's routing), and x3 for training."""
    d = cfg.decoder
    p = _parts(cfg, batch, seq_len, vit_tokens)
    ours = sum(p.values())
    needed = dict(p, attention=2.0 * 2.0 * d.depth * visible_pairs * d.heads * d.head_dim,
                  heads=2.0 * d.width * (text_targets * cfg.vocab_size + noisy_tokens * cfg.patch_dim))
    return {"ours": 3.0 * ours, "maxtext": 3.0 * (ours - 0.5 * p["attention"]),
            "needed": 3.0 * sum(needed.values())}
