"""
A readable Llama-style GPT whose feed-forward network (FFN) is SwiGLU, a Mixture of Experts, or STEM.

    SwiGLU: y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM:   y = W_down( SiLU(W_gate x) * E_l[t] )      E_l: vocab_size x d_ff, one table per STEM layer

STEM replaces the up-projection W_up x with the row of a per-layer table for the token id t at that position:
no router (the token id *is* the routing), a third fewer FFN FLOPs, and parameters that grow with the
vocabulary at flat compute. All STEM layers' tables live side by side in one tensor, GPT.stem_table
[vocab_size, n_stem_layers * d_ff], so one lookup per batch serves every layer (and stem_*.py move one
contiguous row per token). With ffn="swiglu" and untied embeddings this is exactly the Llama architecture.
"""

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import stem_ops

FFN_TYPES = ("swiglu", "moe", "stem", "stem_dagger", "stem_gate")
STEM_TYPES = ("stem", "stem_dagger", "stem_gate")

# Dense bf16 tensor-core peak FLOP/s by GPU model, for MFU. Matched by substring of the CUDA device name,
# most specific first. Unknown GPUs and CPUs get no MFU ("n/a") rather than a made-up number.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
                   ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12), ("RTX 4090", 165e12), ("V100", 125e12)]


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64 for fast matmuls
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    d_ff: Optional[int] = None  # FFN hidden size; None -> 8/3 * n_embd rounded up to a multiple of 64 (2048 at 768)
    ffn: str = "stem"  # one of FFN_TYPES
    stem_layers: Optional[list] = None  # which layers use the STEM FFN; None -> every layer but layer 0
    n_expert: int = 8  # MoE only
    moe_top_k: int = 2  # MoE only: experts per token; each expert has d_ff // moe_top_k hidden units
    moe_aux_weight: float = 0.01  # weight of the Switch load-balancing loss
    moe_z_weight: float = 0.001  # weight of the ST-MoE router z-loss
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"unknown ffn {self.ffn!r}: choose one of {', '.join(FFN_TYPES)}")
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} must split into n_head {self.n_head} heads of even size")
        if self.ffn not in STEM_TYPES:
            self.stem_layers = []  # only STEM models have tables
        elif self.stem_layers is None:
            self.stem_layers = range(1, self.n_layer)
        self.stem_layers = sorted({int(l) for l in self.stem_layers})
        outside = [l for l in self.stem_layers if not 0 <= l < self.n_layer]
        if outside:
            raise ValueError(f"stem_layers {outside} are outside the model: layers are 0..{self.n_layer - 1}")
        if self.ffn == "moe":
            if not 1 <= self.moe_top_k <= self.n_expert:
                raise ValueError(f"moe_top_k {self.moe_top_k} must be between 1 and n_expert {self.n_expert}")
            if self.d_ff % self.moe_top_k:
                raise ValueError(f"d_ff {self.d_ff} must be divisible by moe_top_k {self.moe_top_k}")


@dataclass
class StemRows:
    """The STEM rows one forward pass reads: position (b, t) of STEM layer l reads E_l[inverse[b, t]].
    By default rows is the whole table and inverse the token ids: E[t], plainly. The sparse trainer passes the
    batch's distinct rows (inverse: where each id went), the CPU offload rows from host memory, and knowledge
    editing other tokens' rows."""
    rows: torch.Tensor  # [R, n_stem_layers * d_ff]: row r holds its token's rows for every STEM layer
    inverse: torch.Tensor  # [B, T] int64 indices into rows
    ids: Optional[torch.Tensor] = None  # [R] token id of each row; None when rows is the whole table
    layers: tuple = ()  # rows split into each STEM layer's [R, d_ff] block (GPT.forward fills it)
    fused: bool = False  # read the rows with the Triton kernel (GPT.forward decides, from GPT.stem_kernel)
    plan: tuple = ()  # the Triton backward's work plan, shared by every layer (GPT.forward builds it)

    def __post_init__(self):
        # R, the number of distinct rows, changes every batch: tell torch.compile, or it specialises on the first
        # batch's R and recompiles at the next. (Only once dynamo is loaded: eager runs need not import it.)
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not torch.compiler.is_compiling():
            for t in (self.rows, self.ids):
                if t is not None:
                    dynamo.maybe_mark_dynamic(t, 0)


def check_ids(idx, vocab_size):
    """Bad ids would otherwise surface as an IndexError deep inside, or a device-side assert on a GPU. It reads
    the ids on the host, so callers check batches where they enter (get_batch, generate), not every forward."""
    if idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size {vocab_size}: ids "
                             f"must be in [0, {vocab_size}); was the data tokenized with another tokenizer?")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in float32 as Llama does, then return to the input dtype
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, length, theta):
    """cos/sin of the rotary angles, [length, head_dim], in the rotate-half layout (pairs i and i + d/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class KVCache:
    """Keys and values of every token seen so far, for all layers, preallocated to block_size."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k, self.v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already cached

    def append(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.head_dim = config.n_embd // config.n_head
        self.wq = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wk = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wv = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if kv_cache is not None and kv_cache.pos > 0:  # new queries see all cached keys, new keys up to their own
            k, v = kv_cache.append(self.layer, k, v)
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - T)
            causal = False
        elif kv_cache is not None:
            kv_cache.append(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


# ----------------------------------------------------------------------------------------------------------
# The three FFNs, side by side.

class SwiGLU(nn.Module):
    """y = W_down(SiLU(W_gate x) * W_up x)."""

    def __init__(self, n_embd, d_ff):
        super().__init__()
        self.w_gate = nn.Linear(n_embd, d_ff, bias=False)
        self.w_up = nn.Linear(n_embd, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, n_embd, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class MoE(nn.Module):
    """n_expert SwiGLU experts, each with d_ff // top_k hidden units, so top_k active experts cost the FLOPs
    of one dense SwiGLU of width d_ff (plus the tiny router). Mixtral's router: softmax over all experts in
    float32, keep the top_k, renormalise; no token is dropped."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.aux_weight, self.z_weight = config.moe_top_k, config.moe_aux_weight, config.moe_z_weight
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.d_ff // config.moe_top_k)
                                     for _ in range(config.n_expert))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router stays in float32
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, top_k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # the tokens routed to expert e, and in which of their k slots
            out = expert(x[token]) * weights[token, slot, None].to(x.dtype)
            y.index_add_(0, token, out.to(y.dtype))
        # Switch Transformer load balancing: n_expert * sum_e (share of assignments to e) * (mean prob of e);
        # 1.0 when routing is uniform. ST-MoE z-loss keeps router logits small.
        n_expert = probs.size(-1)
        share = torch.bincount(chosen.flatten(), minlength=n_expert).float() / chosen.numel()
        balance = n_expert * (share * probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return y.view(B, T, C), self.aux_weight * balance + self.z_weight * z_loss


class STEM(nn.Module):
    """y = W_down(SiLU(W_gate x) * E_l[t]): this layer's table row for the input token t replaces W_up x. The
    rows arrive in a StemRows (the tables are GPT.stem_table). Two ablations from the paper share the class:
      stem_dagger: up = W_up x + E_l[t]          stem_gate: y = W_down(SiLU(E_l[t]) * W_up x)"""

    def __init__(self, config, slot):
        super().__init__()
        self.variant, self.slot = config.ffn, slot  # slot: this layer's column block of GPT.stem_table
        if self.variant != "stem_gate":
            self.w_gate = nn.Linear(config.n_embd, config.d_ff, bias=False)
        if self.variant != "stem":
            self.w_up = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.w_down = nn.Linear(config.d_ff, config.n_embd, bias=False)

    def forward(self, x, stem):
        E, t = stem.layers[self.slot], stem.inverse  # this layer's table (or the batch's rows), row per position
        if self.variant == "stem_dagger":
            return self.w_down(F.silu(self.w_gate(x)) * (self.w_up(x) + F.embedding(t, E)))
        if self.variant == "stem_gate":
            return self.w_down(F.silu(F.embedding(t, E)) * self.w_up(x))
        if stem.fused:  # the same formula as one Triton kernel that reads E's rows in place (stem_ops.py)
            return self.w_down(stem_ops.silu_mul_rows(self.w_gate(x), E, t, list(stem.plan)))
        return self.w_down(F.silu(self.w_gate(x)) * F.embedding(t, E))  # F.embedding(t, E) is E[t]


# ----------------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.dropout = config.dropout
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        if layer in config.stem_layers:
            self.ffn = STEM(config, slot=config.stem_layers.index(layer))
        elif config.ffn == "moe":
            self.ffn = MoE(config)
        else:
            self.ffn = SwiGLU(config.n_embd, config.d_ff)  # also the non-STEM layers of a STEM model

    def forward(self, x, cos, sin, kv_cache=None, stem=None):
        x = x + F.dropout(self.attn(self.attn_norm(x), cos, sin, kv_cache), self.dropout, self.training)
        h, aux = self.ffn_norm(x), None
        if isinstance(self.ffn, STEM):
            h = self.ffn(h, stem)
        elif isinstance(self.ffn, MoE):
            h, aux = self.ffn(h)
        else:
            h = self.ffn(h)
        return x + F.dropout(h, self.dropout, self.training), aux


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stem_kernel = "auto"  # "auto" | "triton" | "torch": how STEM layers gather rows (see stem_ops.py)
        self.stem_table_on_host = False  # CPU offload (stem_offload.py): .to(device) leaves the table in host memory
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, l) for l in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # E_l for every STEM layer l, side by side: row t = [E_l1[t] | E_l2[t] | ...]
        n_stem = len(config.stem_layers)
        self.stem_table = nn.Parameter(torch.empty(config.vocab_size, n_stem * config.d_ff)) if n_stem else None
        cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        # GPT-2 init: N(0, 0.02), with the projections that write into the residual stream scaled down
        # by 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name == "stem_table":  # xavier_normal_ on each layer's vocab x d_ff block, as the paper; they all
                # share fan-in and fan-out, so one contiguous fill does it (4x faster than block by block)
                nn.init.normal_(p, std=math.sqrt(2.0 / (self.config.vocab_size + self.config.d_ff)))
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def to(self, *args, **kwargs):
        # with offload the table stays in host memory: unregistered while everything else moves
        if not self.stem_table_on_host or self.stem_table is None:
            return super().to(*args, **kwargs)
        table, self.stem_table = self.stem_table, None
        try:
            return super().to(*args, **kwargs)
        finally:
            self.stem_table = table

    def forward(self, idx, targets=None, stem_rows=None, kv_cache=None, return_aux=False, last_only=False):
        """(logits, loss), or (logits, loss, aux_loss) with return_aux: loss is the plain cross-entropy, the same
        for every FFN; aux_loss the weighted MoE balance + z-loss (0 else), for the trainer to add."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence length {pos + T} exceeds block_size {self.config.block_size}")
        if idx.device.type == "cpu" and not torch.compiler.is_compiling():
            check_ids(idx, self.config.vocab_size)  # free on a CPU; elsewhere batches are checked where they enter
        stem = None
        if self.stem_table is not None:
            if stem_rows is None and self.stem_table.device != idx.device:
                raise ValueError("the STEM table is in host memory (stem_offload): pass stem_rows from "
                                 "stem_offload.py, or move the model with stem_table_on_host=False")
            stem = stem_rows if stem_rows is not None else StemRows(self.stem_table, idx)  # E[t], plainly
            # split once, so the backward assembles one gradient for the stacked rows, not one per layer; the
            # fused kernel's backward plan depends only on the ids, so it too is built once for every layer
            fused = stem_ops.use_triton(self.stem_kernel, stem.rows.device)
            plan = stem_ops.backward_plan(stem.inverse, stem.rows.size(0)) if fused and torch.is_grad_enabled() \
                else ()
            stem = StemRows(stem.rows, stem.inverse, stem.ids, layers=stem.rows.split(self.config.d_ff, dim=1),
                            fused=fused, plan=tuple(plan))
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.drop(self.wte(idx))
        aux_loss = torch.zeros((), device=idx.device)
        for block in self.blocks:
            x, aux = block(x, cos, sin, kv_cache, stem)
            if aux is not None:
                aux_loss = aux_loss + aux
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.norm(x)
        logits = self.lm_head(x[:, -1:] if last_only and targets is None else x)
        loss = None if targets is None else F.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                            targets.reshape(-1), ignore_index=-1)
        return (logits, loss, aux_loss) if return_aux else (logits, loss)

    # ------------------------------------------------------------------------------------------------------
    # Accounting: what a user compares FFN types by.

    def num_params(self):  # every parameter, a tied embedding once
        return sum(p.numel() for p in self.parameters())

    def active_params_per_token(self):
        """Parameters one token touches: a STEM layer reads d_ff table entries, not vocab_size x d_ff, and an
        MoE layer runs top_k of its experts. Embedding and lm_head are counted whole, as the paper does."""
        c, n = self.config, self.num_params()
        if self.stem_table is not None:
            n -= self.stem_table.numel() - self.stem_table.size(1)
        if c.ffn == "moe":
            expert = sum(p.numel() for p in self.blocks[0].ffn.experts[0].parameters())
            n -= c.n_layer * (c.n_expert - c.moe_top_k) * expert
        return n

    def matmul_params_per_token(self):
        """Active weights that take part in a matmul: all but the lookups (embedding, STEM rows) and the norms."""
        c = self.config
        n = self.lm_head.weight.numel()
        for block in self.blocks:
            n += sum(w.weight.numel() for w in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo))
            ffn = block.ffn
            if isinstance(ffn, MoE):
                n += ffn.router.weight.numel() + c.moe_top_k * sum(p.numel() for p in ffn.experts[0].parameters())
            else:
                n += sum(p.numel() for p in ffn.parameters())
        return n

    def flops_per_token(self, seq_len=None, training=True):
        """FLOPs per token: 2 per matmul weight plus attention's 2 * 2 * T * n_embd per layer (the full T, as
        PaLM counts), forward; a training step costs 3x. Table lookups are memory reads, not FLOPs."""
        c = self.config
        forward = 2 * self.matmul_params_per_token() + 4 * c.n_layer * (seq_len or c.block_size) * c.n_embd
        return 3 * forward if training else forward

    def estimate_mfu(self, tokens_per_s, device, seq_len=None):
        """Model FLOPs utilisation against the GPU's dense bf16 peak; None on a CPU or an unknown GPU."""
        if torch.device(device).type != "cuda":
            return None
        peak = next((f for key, f in PEAK_BF16_FLOPS if key in torch.cuda.get_device_name(device)), None)
        return None if peak is None else self.flops_per_token(seq_len) * tokens_per_s / peak

    # ------------------------------------------------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type="cpu",
                             stem_lr_mult=1.0, stem_weight_decay=0.0, include_stem_table=True):
        """AdamW with weight decay on matmul weights only (not norms, not the embedding lookup). The STEM table
        gets its own group: its own weight decay and "lr_mult" (the trainer scales the scheduled lr by it). With
        include_stem_table=False it is left out, for the row-wise optimizer in stem_sparse.py to own."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p is self.stem_table or not p.requires_grad:
                continue
            is_lookup = p is self.wte.weight and not self.config.tie_embeddings
            (decay if p.dim() >= 2 and not is_lookup else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]
        if self.stem_table is not None and include_stem_table:
            groups.append({"params": [self.stem_table], "weight_decay": stem_weight_decay, "lr_mult": stem_lr_mult,
                           "stem": True})
        # the fused AdamW (one kernel over all tensors) exists for CPU and CUDA
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cpu", "cuda"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, stem_rows_fn=None):
        """Append max_new_tokens sampled tokens to idx [B, T]; temperature=0 picks the most likely one. With
        use_cache each step feeds only the new token; past block_size it falls back to the uncached path on the
        last block_size tokens, so both paths give the same tokens. stem_rows_fn(tokens, start) may supply the
        STEM rows for positions start.. (CPU offload, knowledge editing); by default they come from the table."""
        if max_new_tokens > 0 and idx.size(1) == 0:
            raise ValueError("generate needs a prompt of at least one token")
        check_ids(idx, self.config.vocab_size)
        bs = self.config.block_size
        cache = KVCache(self.config, idx.size(0), idx.device, self.lm_head.weight.dtype) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= bs:
                start = cache.pos  # feed what the cache has not seen yet
            else:
                cache, start = None, max(0, idx.size(1) - bs)
            rows = stem_rows_fn(idx, start) if stem_rows_fn is not None and self.stem_table is not None else None
            logits = self(idx[:, start:], stem_rows=rows, kv_cache=cache, last_only=True)[0][:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
