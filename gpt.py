"""A small GPT in one file, in the spirit of nanoGPT's model.py.

GPT-2: pre-LayerNorm blocks, causal attention (scaled_dot_product_attention), a GELU MLP, learned
absolute positions, a tied head, greedy decoding with a key/value cache. PackedInputs (optional) is
the CPU recipe's input encoding, and rotary positions periodic in an example (optional) the scaling
experiment's (docs/recipe.md). Nothing here knows about tasks: ids to logits."""

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
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, last_only=False, rotation=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        if last_only:  # every position's key and value, the last one's query only
            q, T = q[:, :, -1:], 1
        # A query per key (a full forward or a prefill) is causal; one new token sees every key.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T == k.size(2) and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


def rotate(t, rotation):
    """Rotary positions: each pair of dimensions (j, j + head_size / 2) of t (B, H, T, head_size)
    turned by its positions' angles, rotation (T, head_size) = (cos, sin), so that a query's score
    with a key depends on their positions' difference only."""
    cos, sin = rotation.to(t.dtype).chunk(2, dim=-1)
    a, b = t.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(OrderedDict(  # GPT-2's MLP
            c_fc=nn.Linear(config.n_embd, 4 * config.n_embd), gelu=nn.GELU(),
            c_proj=nn.Linear(4 * config.n_embd, config.n_embd), dropout=nn.Dropout(config.dropout)))

    def forward(self, x, cache=None, last_only=False, rotation=None):
        x = (x[:, -1:] if last_only else x) + self.attn(self.ln_1(x), cache, last_only, rotation)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of every layer for a batch being decoded, preallocated at the first call."""
    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len, self.keys, self.values = n_layer, max_len, None, None
        self.length = self.tokens = 0  # positions and tokens stored (a packed input: one position)
        self.last_input = self.last_position = None  # what the next packed chunk broadcasts/shifts

    def extend(self, layer, k, v):
        """Store this layer's new keys and values; return all of them so far."""
        if self.keys is None:  # in k's dtype, which autocast may have changed
            shape = (self.n_layer, *k.shape[:2], self.max_len, k.size(3))
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end], self.values[layer, :, :, self.length:end] = k, v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class PackedLayout(NamedTuple):
    """Where the tokens of a chunk go (PackedInputs.layout); index tensors on the model's device."""
    offset: torch.Tensor  # per token: its offset in its example (below input_len: an input's)
    slot: torch.Tensor  # per token: its position, counted from the chunk's first
    predicting: torch.Tensor  # tokens their position's output predicts (an input's last, answers)
    slot_example: torch.Tensor  # per position: its example
    input_slots: torch.Tensor  # the positions that are inputs
    broadcast_source: torch.Tensor  # 0 none (an input), 1 the cache's last input, 2+j input j here


class PackedInputs(nn.Module):
    """The CPU recipe's input encoding: an example's input tokens enter as ONE position (a learned
    embedding per (offset, token), summed), broadcast through a learned map to the example's later
    positions; a position is (offset in its example) + (example index); with token_shift every
    position also gets a learned map of the previous position's embedding."""
    def __init__(self, config):
        super().__init__()
        assert 0 < config.input_len < config.example_len, (
            "a packed input needs example_len > input_len")
        self.config = config
        self.wte_input = nn.Embedding(config.input_len * config.vocab_size, config.n_embd)
        self.input_to_answers = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.token_shift = (nn.Linear(config.n_embd, config.n_embd, bias=False)
                            if config.token_shift else None)
        self.wpe = nn.Embedding(config.example_len, config.n_embd)
        self.wpe_example = nn.Embedding(-(-config.block_size // config.example_len), config.n_embd)
        self.layouts = {}  # by (start, length, device): a layout is computed once per shape

    def layout(self, start, length, device):
        """Where tokens start..start+length-1 go, computed on the CPU once, kept on the device."""
        key = (start, length, str(device))
        if key not in self.layouts:
            E, P = self.config.example_len, self.config.input_len
            index = torch.arange(start, start + length)
            offset = index % E
            slot = index // E * (E - P + 1) + (offset - P + 1).clamp(min=0)
            slot_example = (slot[0] + torch.arange(int(slot[-1] - slot[0]) + 1)) // (E - P + 1)
            slot = slot - slot[0]
            input_slots = slot[offset < P].unique_consecutive()
            broadcast_source = 2 + slot_example - slot_example[0] - int(offset[0] >= P)
            broadcast_source[input_slots] = 0
            layout = (offset, slot, (offset >= P - 1).nonzero().squeeze(1), slot_example,
                      input_slots, broadcast_source)
            self.layouts[key] = PackedLayout(*(t.to(device) for t in layout))
        return self.layouts[key]

    def forward(self, idx, start, wte, cache=None):
        """Input vectors (B, positions, C) for idx (B, T) from token `start`, and their layout."""
        if cache is not None and 0 < start % self.config.example_len < self.config.input_len:
            raise ValueError("with packed inputs, a cached call may not start inside an input")
        layout = self.layout(start, idx.size(1), idx.device)
        offset, P, V = layout.offset, self.config.input_len, self.config.vocab_size
        x = torch.where((offset < P)[..., None], self.wte_input(offset.clamp(max=P - 1) * V + idx),
                        wte(idx) + self.wpe(offset))
        packed = x.new_zeros(idx.size(0), len(layout.slot_example), x.size(-1)).index_add_(
            1, layout.slot, x)
        none = packed.new_zeros(idx.size(0), 1, packed.size(-1))
        cache = cache or KVCache(0, 0)  # no cache: the chunk starts a sequence, nothing before it
        if self.token_shift is not None:
            previous, cache.last_position = (
                none if cache.last_position is None else cache.last_position, packed[:, -1:])
            packed = packed + self.token_shift(torch.cat([previous, packed[:, :-1]], dim=1))
        # Each input, broadcast to the rest of its example (a cached chunk may need the cache's).
        inputs = packed[:, layout.input_slots]
        previous = none if cache.last_input is None else cache.last_input
        packed = packed + self.input_to_answers(
            torch.cat([none, previous, inputs], dim=1)[:, layout.broadcast_source])
        cache.last_input = inputs[:, -1:] if inputs.size(1) else cache.last_input
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
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        if config.rotary:  # harmonic j of position p: angle 2 pi j p / (positions per example),
            # so "the same step of another example" is one relation whatever the step. Harmonics
            # j and period - j score alike, and multiples of the period turn nothing: a score
            # periodic in the period has only that many values.
            # positions per example: a packed input's input_len tokens are one position
            period = config.example_len - max(0, config.input_len - 1)
            head_size = config.n_embd // config.n_head
            assert period > 0 and head_size % 2 == 0, "rotary needs example_len, an even head size"
            angle = (2 * math.pi * torch.arange(config.block_size, dtype=torch.float32)[:, None]
                     * torch.arange(1, head_size // 2 + 1, dtype=torch.float32) / period)
            # computed from the config, not learned: not in the state dict
            self.register_buffer("rotation", torch.cat([angle.cos(), angle.sin()], 1),
                                 persistent=False)
        # Initialised in this order: GPT-2's N(0, 0.02) weights, zero biases, N(0, embedding_std)
        # embeddings (the tied head is one); residual projections scaled by depth (GPT-2), so that
        # residual variance does not grow with it; PackedInputs' maps norm-preserving: what is
        # broadcast or shifted in is as loud as the embedding it joins.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = (config.embedding_std
                       if isinstance(module, nn.Embedding) or module is self.lm_head else 0.02)
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for name, p in self.named_parameters():
            if name in ("packed.input_to_answers.weight", "packed.token_shift.weight"):
                nn.init.normal_(p, mean=0.0, std=1 / math.sqrt(config.n_embd))
        self.n_params = sum(p.numel() for p in self.parameters())  # the tied head counted once

    def forward(self, idx, cache=None, last_only=False):
        """Logits (B, T, vocab_size) for token ids idx (B, T), continuing the cache if one is given;
        last_only: the last token's only (B, 1, vocab_size), as cached decoding needs."""
        start, T = (cache.tokens if cache is not None else 0), idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        if self.packed is None:
            x = self.wte(idx) + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            x, layout = self.packed(idx, start, self.wte, cache)
        x, n_positions = self.drop(x), x.size(1)
        first = cache.length if cache is not None else 0  # positions before this call's
        rotation = self.rotation[first:first + n_positions] if self.config.rotary else None
        for block in self.blocks:
            x = block(x, cache, last_only and block is self.blocks[-1], rotation)
        if cache is not None:
            cache.length, cache.tokens = cache.length + n_positions, cache.tokens + T
        logits = self.lm_head(self.ln_f(x))
        # last_only: the last position predicts the last token's successor, packed or not
        return logits if self.packed is None or last_only else self.packed.unpack(logits, layout)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, use_cache=True):
        """Greedy decoding: the (B, max_new_tokens) tokens that follow idx. Without the cache, every
        step is the plain full forward: the reference the cached path must equal."""
        cache = KVCache(self.config.n_layer, idx.size(1) + max_new_tokens) if use_cache else None
        new_tokens, context = [], idx
        for _ in range(max_new_tokens):  # without the cache, last_only=False: the plain forward
            logits = self(context, cache, last_only=use_cache)[:, -1]
            new_tokens.append(logits.argmax(dim=-1, keepdim=True))
            context = new_tokens[-1] if use_cache else torch.cat([context, new_tokens[-1]], dim=1)
        return torch.cat(new_tokens, dim=1)
