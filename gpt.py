"""A small GPT in one file, in the spirit of nanoGPT's model.py.

Pre-LayerNorm transformer blocks, causal attention through
torch.nn.functional.scaled_dot_product_attention, a GELU MLP, GPT-2 style
initialisation, weight-tied output head, and greedy decoding with a key/value
cache. Nothing in here knows about tasks: it maps token ids to logits.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence the position encoding covers
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 192
    dropout: float = 0.0  # GPT-2's is 0.1: on embeddings, attention weights and residual branches
    bias: bool = True
    embedding_std: float = 0.02  # initial std of every embedding (GPT-2: 0.02); the tied head starts as wte
    # The CPU recipe's input encoding (docs/recipe.md); off, the model is GPT-2 with learned absolute positions.
    # input_len P > 0: a sequence is a run of examples of example_len E tokens whose first P, the input x,
    # enter as ONE position (a learned embedding per (offset, token), summed), broadcast through a learned
    # map to the example's later positions; positions are (offset in the example) + (example index).
    example_len: int = 0
    input_len: int = 0
    token_shift: bool = False  # every position also gets a learned map of the previous position's embedding


class PackedLayout(NamedTuple):
    """Where the tokens of a chunk go when inputs are packed (GPT.packed_layout)."""
    is_input: torch.Tensor  # per token: part of an input
    slot: torch.Tensor  # per token: its position, counted from the chunk's first
    predicting: torch.Tensor  # tokens whose position's output is their prediction (last input token, answers)
    slot_example: torch.Tensor  # per position: its example
    input_slots: torch.Tensor  # the positions that are inputs
    broadcast_source: torch.Tensor  # per position: where its broadcast input comes from (see packed_layout)


class KVCache:
    """Keys and values of every layer for a batch being decoded, preallocated."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.keys = self.values = None  # allocated at the first call, in k's dtype (autocast may change it)
        self.length = 0  # positions already stored (a packed input is one); advanced by GPT.forward
        self.tokens = 0  # tokens already seen; advanced by GPT.forward
        self.last_input = None  # the packed vector of the latest input, to broadcast
        self.last_position = None  # the embedding of the latest position, for token_shift

    def extend(self, layer, k, v):
        """Store this layer's new keys/values, return all of them so far."""
        if self.keys is None:
            B, H, _, head_dim = k.shape
            shape = (self.n_layer, B, H, self.max_len, head_dim)
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, last_only=False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if last_only:
            q = q[:, :, -1:]
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        # Queries for every key (a full forward or a prefill) need the causal mask; the
        # last token alone (a decoding step) may see every key, so it needs none.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=q.size(2) == k.size(2) and q.size(2) > 1)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, q.size(2), C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, last_only=False):
        attended = self.attn(self.ln_1(x), cache, last_only)
        x = (x[:, -1:] if last_only else x) + attended
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.input_len:  # packed inputs, broadcast to their examples' later positions
            assert 0 < config.input_len < config.example_len, "a packed input needs example_len > input_len"
            self.wte_input = nn.Embedding(config.input_len * config.vocab_size, config.n_embd)
            self.input_to_answers = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.token_shift:
            self.token_shift = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.input_len:
            self.wpe = nn.Embedding(config.example_len, config.n_embd)
            self.wpe_example = nn.Embedding(-(-config.block_size // config.example_len), config.n_embd)
        else:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self.layouts = {}  # packed layouts by (start, length, device): see device_layout
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by depth so the residual stream's
        # variance does not grow with the number of layers.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # norm-preserving: what is broadcast or shifted in is as loud as the embedding it joins
        for extra in ("input_to_answers", "token_shift"):
            if hasattr(self, extra):
                nn.init.normal_(getattr(self, extra).weight, mean=0.0, std=1 / math.sqrt(config.n_embd))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            # the output head is the token embedding (tied), so it is initialised as one
            std = self.config.embedding_std if isinstance(module, nn.Embedding) or module is self.lm_head else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def packed_layout(self, start, length):
        """Where tokens start..start+length-1 go when inputs are packed. Pure arithmetic on token
        indices, done on the CPU, so that sizes and indices never wait on the device."""
        E, P = self.config.example_len, self.config.input_len
        pos = torch.arange(start, start + length)
        offset, example = pos % E, pos // E
        slot = example * (E - P + 1) + (offset - P + 1).clamp(min=0)
        n_slots = int(slot[-1] - slot[0]) + 1
        slot_example = (slot[0] + torch.arange(n_slots)) // (E - P + 1)
        slot = slot - slot[0]  # counted from the chunk's first position
        input_slots = slot[offset < P].unique_consecutive()
        # Where each position's broadcast input vector comes from: 0 none (it is an input),
        # 1 the cache's latest input (the chunk starts after its example's input), 2 + j the j-th input here.
        broadcast_source = 2 + slot_example - slot_example[0] - int(offset[0] >= P)
        broadcast_source[input_slots] = 0
        return PackedLayout(offset < P, slot, (offset >= P - 1).nonzero().squeeze(1), slot_example, input_slots,
                            broadcast_source)

    def device_layout(self, start, length, device):
        """packed_layout on the device, computed once per (start, length, device) and then reused."""
        key = (start, length, str(device))
        if key not in self.layouts:
            self.layouts[key] = PackedLayout(*(t.to(device) for t in self.packed_layout(start, length)))
        return self.layouts[key]

    def embed(self, idx, start, layout=None, cache=None):
        """Input vectors (B, positions, C) for tokens idx (B, T) that start at token `start`
        (with packed inputs, their packed_layout on idx's device)."""
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        E, P = self.config.example_len, self.config.input_len
        if not P:  # GPT-2
            return self.shifted(self.wte(idx) + self.wpe(pos), cache)
        offset = pos % E
        # Packed inputs: an example's P input tokens share one position, the one of its last.
        x = torch.where(layout.is_input.unsqueeze(-1), self.wte_input(offset.clamp(max=P - 1) * self.config.vocab_size + idx),
                        self.wte(idx) + self.wpe(offset))
        packed = x.new_zeros(idx.size(0), len(layout.slot_example), x.size(-1)).index_add_(1, layout.slot, x)
        packed = self.shifted(packed, cache)
        # Each input, broadcast to its example's later positions (the first of a cached chunk may need the cache's).
        inputs = packed[:, layout.input_slots]
        none = packed.new_zeros(idx.size(0), 1, packed.size(-1))
        previous = cache.last_input if cache is not None and cache.last_input is not None else none
        packed = packed + self.input_to_answers(torch.cat([none, previous, inputs], dim=1)[:, layout.broadcast_source])
        if cache is not None and inputs.size(1):
            cache.last_input = inputs[:, -1:]
        return packed + self.wpe_example(layout.slot_example)

    def shifted(self, x, cache=None):
        """x (B, positions, C) plus, with token_shift, the map of each position's predecessor
        (for the first, the cache's latest position, or nothing at the start)."""
        if not self.config.token_shift:
            return x
        first = cache.last_position if cache is not None and cache.last_position is not None else x.new_zeros(
            x.size(0), 1, x.size(-1))
        if cache is not None:
            cache.last_position = x[:, -1:]
        return x + self.token_shift(torch.cat([first, x[:, :-1]], dim=1))

    def forward(self, idx, cache=None, last_only=False):
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        With a cache, idx continues the tokens the cache already holds. With last_only, the
        logits of the last token only, (B, 1, vocab_size): all a decoder needs, and the last
        block then computes just its keys and values for the other tokens.
        """
        start = cache.tokens if cache is not None else 0
        if start + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {start + idx.size(1)} tokens exceeds block_size {self.config.block_size}")
        if cache is not None and 0 < start % max(1, self.config.example_len) < self.config.input_len:
            raise ValueError("with packed inputs, a cached call may not start inside an input")
        layout = self.device_layout(start, idx.size(1), idx.device) if self.config.input_len else None
        x = self.drop(self.embed(idx, start, layout, cache))
        n_positions = x.size(1)
        for block in self.blocks:
            x = block(x, cache, last_only and block is self.blocks[-1])
        if cache is not None:
            cache.length += n_positions
            cache.tokens += idx.size(1)
        if layout is None:
            return self.lm_head(self.ln_f(x))
        # Packed inputs, back to one row per token: a position's logits go to the token it
        # predicts for, the other input tokens get zeros (the model does not predict inputs).
        slot, predicting = layout.slot, layout.predicting
        if last_only:  # x holds the last position only: the last token's, if it predicts (an answer or an input's last)
            E, P = self.config.example_len, self.config.input_len
            predicting = predicting[-1:] - (idx.size(1) - 1) if (start + idx.size(1) - 1) % E >= P - 1 else predicting[:0]
            slot = torch.zeros(1, dtype=torch.long, device=idx.device)
        predicted = self.lm_head(self.ln_f(x[:, slot[predicting]]))
        logits = predicted.new_zeros(idx.size(0), 1 if last_only else idx.size(1), self.config.vocab_size)
        logits[:, predicting] = predicted
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, use_cache=True):
        """Greedy decoding: the (B, max_new_tokens) tokens that follow idx."""
        cache = KVCache(self.config.n_layer, idx.size(1) + max_new_tokens) if use_cache else None
        new_tokens = []
        context = idx
        for _ in range(max_new_tokens):
            # Recomputation is the plain full forward: the reference the cached path must equal.
            logits = self(context, cache, last_only=True)[:, -1] if use_cache else self(context)[:, -1]
            next_token = logits.argmax(dim=-1, keepdim=True)
            new_tokens.append(next_token)
            # With a cache only the new token goes in next; without, everything again.
            context = next_token if use_cache else torch.cat([context, next_token], dim=1)
        return torch.cat(new_tokens, dim=1)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
