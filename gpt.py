"""A small GPT in one file, in the spirit of nanoGPT's model.py.

GPT-2: pre-LayerNorm blocks, causal attention (scaled_dot_product_attention), a GELU MLP, learned
absolute positions, a tied head. PackedInputs (optional) is the CPU recipe's input encoding, and
rotary positions periodic in an example (optional) the scaling experiment's (docs/recipe.md).
Nothing here knows about tasks: ids to logits."""

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest sequence, in tokens
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 192
    dropout: float = 0.0  # GPT-2's is 0.1: on embeddings, attention weights and residual branches
    embedding_std: float = 0.02  # initial std of each embedding (GPT-2: 0.02); the tied head is wte
    example_len: int = 0  # PackedInputs (input_len > 0): a sequence is a run of examples this long
    input_len: int = 0  # tokens, the first input_len of which (the input x) enter as one position
    token_shift: bool = False  # PackedInputs: every position also gets a map of the previous one
    rotary: bool = False  # queries and keys rotated by position, periodic in an example's positions

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotation=None, n_last=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        mask = None
        if n_last:  # the last n_last queries only, each seeing the keys up to its own position
            q, mask = q[:, :, -n_last:], x.new_ones(n_last, T, dtype=torch.bool).tril(T - n_last)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, -1, C)))

def rotate(t, rotation):
    """Rotary positions: each pair of dimensions (j, j + head_size / 2) of t (B, H, T, head_size)
    turned by its positions' angles, rotation (T, head_size) = (cos, sin), so that a query's score
    with a key depends on their positions' difference only."""
    cos, sin = rotation.to(t.dtype).chunk(2, dim=-1)
    a, b = t.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(OrderedDict(  # GPT-2's MLP
            c_fc=nn.Linear(config.n_embd, 4 * config.n_embd), gelu=nn.GELU(),
            c_proj=nn.Linear(4 * config.n_embd, config.n_embd), dropout=nn.Dropout(config.dropout)))

    def forward(self, x, rotation=None, n_last=None):
        x = (x[:, -n_last:] if n_last else x) + self.attn(self.ln_1(x), rotation, n_last)
        return x + self.mlp(self.ln_2(x))

class PackedLayout(NamedTuple):
    """Where a sequence's tokens go (PackedInputs.layout); index tensors on the model's device."""
    offset: torch.Tensor  # per token: its offset in its example (below input_len: an input's)
    slot: torch.Tensor  # per token: its position
    predicting: torch.Tensor  # tokens their position's output predicts (an input's last, answers)
    slot_example: torch.Tensor  # per position: its example
    input_slots: torch.Tensor  # the positions that are inputs
    broadcast_source: torch.Tensor  # per position, into [none, inputs]: 0 (an input), 1 + example

class PackedInputs(nn.Module):
    """The CPU recipe's input encoding: an example's input tokens enter as ONE position (a learned
    embedding per (offset, token), summed), broadcast through a learned map to the example's later
    positions; a position is (offset in its example) + (example index); with token_shift every
    position also gets a learned map of the previous position's embedding."""
    def __init__(self, config):
        super().__init__()
        assert 0 < config.input_len < config.example_len, "packing needs example_len > input_len"
        self.config = config
        self.wte_input = nn.Embedding(config.input_len * config.vocab_size, config.n_embd)
        self.input_to_answers = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.token_shift = (nn.Linear(config.n_embd, config.n_embd, bias=False)
                            if config.token_shift else None)
        self.wpe = nn.Embedding(config.example_len, config.n_embd)
        self.wpe_example = nn.Embedding(-(-config.block_size // config.example_len), config.n_embd)
        self.layouts = {}  # by (length, device): a layout is computed once per shape

    def layout(self, length, device):
        """Where a sequence's length tokens go, computed on the CPU once, kept on the device."""
        if (length, str(device)) not in self.layouts:
            E, P = self.config.example_len, self.config.input_len
            offset = torch.arange(length) % E
            slot = torch.arange(length) // E * (E - P + 1) + (offset - P + 1).clamp(min=0)
            slot_example = torch.arange(int(slot[-1]) + 1) // (E - P + 1)
            input_slots = slot[offset < P].unique_consecutive()
            layout = (offset, slot, (offset >= P - 1).nonzero().squeeze(1), slot_example,
                      input_slots, (1 + slot_example).index_fill(0, input_slots, 0))
            self.layouts[length, str(device)] = PackedLayout(*(t.to(device) for t in layout))
        return self.layouts[length, str(device)]

    def forward(self, idx, wte):
        """Input vectors (B, positions, C) for idx (B, T), and their layout."""
        layout = self.layout(idx.size(1), idx.device)
        offset, P, V = layout.offset, self.config.input_len, self.config.vocab_size
        x = torch.where((offset < P)[..., None], self.wte_input(offset.clamp(max=P - 1) * V + idx),
                        wte(idx) + self.wpe(offset))
        packed = x.new_zeros(idx.size(0), len(layout.slot_example), x.size(-1)).index_add_(
            1, layout.slot, x)
        none = packed.new_zeros(idx.size(0), 1, packed.size(-1))
        if self.token_shift is not None:
            packed = packed + self.token_shift(torch.cat([none, packed[:, :-1]], dim=1))
        inputs = torch.cat([none, packed[:, layout.input_slots]], dim=1)
        packed = packed + self.input_to_answers(inputs[:, layout.broadcast_source])
        return packed + self.wpe_example(layout.slot_example), layout

    def unpack(self, logits, layout):
        """Logits per token from those per position; input tokens that predict nothing get zeros."""
        unpacked = logits.new_zeros(logits.size(0), len(layout.slot), logits.size(-1))
        unpacked[:, layout.predicting] = logits[:, layout.slot[layout.predicting]]
        return unpacked

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.packed = PackedInputs(config) if config.input_len else None
        if self.packed is None:
            assert not config.token_shift, "token_shift is part of PackedInputs"
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        if config.rotary:  # harmonic j of position p turns by 2 pi j p / period, the positions
            # per example (a packed input is one), so "the same step of another example" is one
            # relation whatever the step. Harmonics j and period - j score alike, and multiples of
            # the period turn nothing: a score periodic in the period has only that many values.
            period = config.example_len - max(0, config.input_len - 1)
            head_size = config.n_embd // config.n_head
            assert period > 0 and head_size % 2 == 0, "rotary needs example_len, an even head size"
            angle = (2 * math.pi * torch.arange(config.block_size, dtype=torch.float32)[:, None]
                     * torch.arange(1, head_size // 2 + 1, dtype=torch.float32) / period)
            self.register_buffer("rotation", torch.cat([angle.cos(), angle.sin()], 1),
                                 persistent=False)  # not learned: kept out of the state dict
        # Initialised in this order: GPT-2's N(0, 0.02) weights, zero biases, N(0, embedding_std)
        # embeddings (the tied head is one); residual projections scaled by depth (GPT-2), so that
        # residual variance does not grow with it; PackedInputs' maps norm-preserving: what is
        # broadcast or shifted in is as loud as the embedding it joins.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                embedding = isinstance(module, nn.Embedding) or module is self.lm_head
                nn.init.normal_(module.weight, std=config.embedding_std if embedding else 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
        for name, p in self.named_parameters():
            if name in ("packed.input_to_answers.weight", "packed.token_shift.weight"):
                nn.init.normal_(p, std=1 / math.sqrt(config.n_embd))
        self.n_params = sum(p.numel() for p in self.parameters())  # the tied head counted once

    def forward(self, idx, n_last=None):
        """Logits (B, T, vocab_size) for token ids idx (B, T). n_last: those of the last n_last
        positions only (B, n_last, vocab_size), which the last block then computes alone; with
        packed inputs, positions are tokens only where no input lies (as an answer's)."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {idx.size(1)} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if self.packed is None:
            x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        else:
            x, layout = self.packed(idx, self.wte)
        x = self.drop(x)
        rotation = self.rotation[:x.size(1)] if self.config.rotary else None
        for block in self.blocks:
            x = block(x, rotation, n_last if block is self.blocks[-1] else None)
        logits = self.lm_head(self.ln_f(x))
        return logits if self.packed is None or n_last else self.packed.unpack(logits, layout)
