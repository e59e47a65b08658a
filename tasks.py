"""ARC task families and the one sequence format they share.

A family has D options per step and T steps; a task is a tuple theta = (theta_1..theta_T),
each theta_t an option index in 0..D-1. A family says how its tasks are enumerated, how an
input x is drawn, and how each answer step y_t follows from (x, y_<t, theta_t). Everything
else (the sequence of N examples, chain of thought or answer only, the loss mask) is
`make_batch`, written once for every family.

Samplers are vectorized: a whole batch of tasks becomes a batch of sequences in a few
tensor operations, generated directly on the training device.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

SEPARATOR = "<sep>"


class ARCFamily:
    """The interface every family implements.

    Subclasses set in __init__: `name`, `n_options` (D), `n_steps` (T), `input_len` (tokens
    of one input x), `n_answer_steps` and `tokens_per_step` (the answer with chain of thought
    is n_answer_steps x tokens_per_step tokens; without it, the last step's tokens only),
    and call `super().__init__(tokens)` with their vocabulary. They implement `all_tasks`
    and `sample`.
    """

    def __init__(self, tokens):
        self.tokens = list(tokens) + [SEPARATOR]  # the separator is a token of its own
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"{self.name}: vocabulary has repeated tokens")
        self.separator_id = len(self.tokens) - 1

    @property
    def vocab_size(self):
        return len(self.tokens)

    def all_tasks(self):
        """Every task, as an int array (n_tasks, T), in a fixed deterministic order."""
        raise NotImplementedError

    def sample(self, tasks, n_examples, generator):
        """Draw n_examples fresh inputs for each task of tasks (B, T), a long tensor.

        Returns (inputs, answers): token ids of shape (B, n_examples, input_len) and
        (B, n_examples, n_answer_steps, tokens_per_step), on tasks' device.
        """
        raise NotImplementedError

    def example_len(self, cot):
        answer_steps = self.n_answer_steps if cot else 1
        return self.input_len + 1 + answer_steps * self.tokens_per_step

    def answer_len(self, cot):
        return self.example_len(cot) - self.input_len - 1

    def decode(self, ids):
        return " ".join(self.tokens[i] for i in ids)


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, N * example_len) token ids
    answer_mask: torch.Tensor  # (N * example_len,) bool, True on answer tokens, the same for every sample
    answer_len: int  # the query's answer is tokens[:, -answer_len:]
    tokens_per_step: int  # answer token j belongs to step j // tokens_per_step


def make_batch(family, tasks, n_examples, cot, generator):
    """N examples of each task, concatenated: input tokens, separator, answer tokens.

    With cot the answer is every step y_1..y_T; without, only the last step y_T.
    The last example is the query that evaluation scores.
    """
    inputs, answers = family.sample(tasks, n_examples, generator)
    if not cot:
        answers = answers[:, :, -1:]
    answers = answers.flatten(2)
    B, N, _ = inputs.shape
    separator = inputs.new_full((B, N, 1), family.separator_id)
    tokens = torch.cat([inputs, separator, answers], dim=2)
    is_answer = torch.arange(tokens.size(2), device=tokens.device) > inputs.size(2)
    return Batch(
        tokens=tokens.flatten(1),
        answer_mask=is_answer.repeat(N),
        answer_len=answers.size(2),
        tokens_per_step=family.tokens_per_step,
    )


class SparseParity(ARCFamily):
    """x uniform in {0,1}^d; theta = k distinct coordinates; y_t = x_theta1 xor ... xor x_thetat.

    Sorted tuples by default (C(d,k) tasks); ordered tuples (d!/(d-k)! tasks) when
    unsorted, the chain of thought then following the tuple's order.
    """

    def __init__(self, d, k, unsorted=False, joint_inputs=False):
        if d < 1:
            raise ValueError(f"d must be at least 1, got {d}")
        if not 1 <= k <= d:
            raise ValueError(f"k must be between 1 and d={d}, got {k}")
        self.name = "parity"
        self.d, self.k, self.unsorted = d, k, unsorted
        self.n_options, self.n_steps = d, k
        self.input_len, self.n_answer_steps, self.tokens_per_step = d, k, 1
        self.joint_inputs = joint_inputs
        super().__init__(["0", "1"] + ([f"x{i}={b}" for i in range(d) for b in (0, 1)] if joint_inputs else []))

    def all_tasks(self):
        tuples = itertools.permutations if self.unsorted else itertools.combinations
        return np.array(list(tuples(range(self.d), self.k)), dtype=np.int64).reshape(-1, self.k)

    def sample(self, tasks, n_examples, generator):
        B = tasks.size(0)
        x = torch.randint(0, 2, (B, n_examples, self.d), generator=generator, device=tasks.device)
        chosen = x.gather(2, tasks[:, None, :].expand(B, n_examples, self.k))
        prefix_parities = chosen.cumsum(dim=2) % 2
        if self.joint_inputs:
            return 2 + 2 * torch.arange(self.d, device=x.device) + x, prefix_parities.unsqueeze(3)
        return x, prefix_parities.unsqueeze(3)
