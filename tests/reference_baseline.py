"""The foundation's baseline GPT (issue 2, commit a540516), frozen as a test reference: the current model with
every seed-stack technique off must compute exactly this function for the same weights."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split RoPE on (B, T, H, D): pairs (i, i + D/2) rotate by angle t * base^(-2i/D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, use_fa3: bool) -> Tensor:
    """Causal attention on (B, T, H, D) tensors with grouped KV heads: query head h reads KV head
    h // (H / Hkv). FlashAttention 3 and SDPA compute the same function; FA3 needs bf16 inputs."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


def zero_init_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class CausalSelfAttention(nn.Module):
    def __init__(self, h, use_fa3: bool):
        super().__init__()
        dim, self.num_heads, self.num_kv_heads = h.model_dim, h.num_heads, h.num_kv_heads
        self.head_dim, self.use_fa3 = dim // h.num_heads, use_fa3
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, kv_dim, bias=False)
        self.c_v = nn.Linear(dim, kv_dim, bias=False)
        self.proj = zero_init_linear(dim, dim)
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin)  # QK-norm, then RoPE
        q = q * self.q_gain.to(q.dtype)[:, None]
        return self.proj(attention(q, k, v, self.use_fa3).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, h):
        super().__init__()
        hidden = int(h.mlp_mult * h.model_dim)
        self.fc = nn.Linear(h.model_dim, hidden, bias=False)
        self.proj = zero_init_linear(hidden, h.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    """Pre-norm block with per-channel control tensors: resid_mix blends the stream with the embedding x0,
    attn_scale and mlp_scale weigh the two residual branches."""

    def __init__(self, h, use_fa3: bool):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(h, use_fa3), MLP(h)
        self.attn_scale = nn.Parameter(torch.ones(h.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(h.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(h.model_dim), torch.zeros(h.model_dim))))

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), cos, sin)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    """The baseline GPT: tied embeddings, RMSNorm, GQA attention with RoPE, ReLU^2 MLP, U-Net skips from the
    first half of the blocks to the second (LIFO, learned per-channel weights), tanh logit softcap."""

    def __init__(self, h, use_fa3: bool = False):
        super().__init__()
        self.logit_softcap = h.logit_softcap
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        if h.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        self.blocks = nn.ModuleList(Block(h, use_fa3) for _ in range(h.num_layers))
        self.num_encoder = h.num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, h.num_layers - self.num_encoder),
                                                    h.model_dim))
        self.lm_head = None if h.tie_embeddings else zero_init_linear(h.model_dim, h.vocab_size)
        head_dim = h.model_dim // h.num_heads
        inv_freq = h.rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward_logits(self, input_ids: Tensor) -> Tensor:
        x = x0 = rms_norm(self.tok_emb(input_ids))
        angles = torch.outer(torch.arange(input_ids.size(1), device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = (f(angles)[None, :, None, :].to(x.dtype) for f in (torch.cos, torch.sin))
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = block(x, x0, cos, sin)
            if i < self.num_encoder:
                skips.append(x)
        x = rms_norm(x)
        logits = F.linear(x, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight).float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def forward(self, input_ids: Tensor, target_ids: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy in fp32: the mean (training) or per position, shaped like target_ids (evaluation)."""
        logits = self.forward_logits(input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), target_ids.flatten(), reduction=reduction)
        return loss if reduction == "mean" else loss.view_as(target_ids)
