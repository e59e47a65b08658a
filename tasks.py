"""ARC task families and the one sequence format they share.

A family has D options per step and T steps; a task is a tuple theta = (theta_1..theta_T),
each theta_t an option index in 0..D-1. A family says which tuples are its tasks (its
universe, indexed by rank and never listed), how an input x is drawn, and how each answer step
y_t follows from (x, y_<t, theta_t). Everything else (the sequence of N examples, chain of
thought or answer only, the loss mask) is `make_batch`, written once for every family."""

import bisect
import math
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------- task universes
class TaskUniverse:
    """Every tuple (theta_1..theta_T) of a family, T = k steps of D = n options each, indexed and
    never listed: rank r in 0..size-1 <-> tuple, in Python integers, so that even C(100, 50) tasks
    cost nothing until drawn. Subclasses give the bijection unrank(r) and count(fixed=None,
    avoid=()): how many tuples have theta_c = v (fixed = (c, v), c 0-based; None: any) and use no
    option of the set avoid (exclusions count the tasks they remove with it)."""
    def __init__(self, n, k):
        self.n, self.k = n, k
        self.size = self.count()  # how many tuples there are

    def options(self, t):  # the options step t (0-based) takes in some tuple
        return range(self.n)

    def tuples(self, ranks):  # the tuples of ranks, as an int array (len(ranks), T)
        return np.array([self.unrank(r) for r in ranks], dtype=np.int64).reshape(-1, self.k)

class SortedTuples(TaskUniverse):
    """k distinct options in increasing order: C(n, k) tuples, ranked by the combinatorial number
    system, rank = sum_i C(theta_i, i + 1) (the colexicographic order)."""
    def count(self, fixed=None, avoid=()):
        free = [o for o in range(self.n) if o not in avoid]
        if fixed is None:
            return math.comb(len(free), self.k)
        c, v = fixed
        below = sum(o < v for o in free)
        return (math.comb(below, c) * math.comb(len(free) - below - 1, self.k - 1 - c)
                if v in free else 0)

    def options(self, t):
        return range(t, self.n - self.k + t + 1)  # t smaller options before, k - 1 - t larger after

    def unrank(self, r):
        task = []
        for i in reversed(range(self.k)):  # largest option first: largest c with C(c, i + 1) <= r
            c = i - 1 + bisect.bisect_right(range(i, self.n), r, key=lambda o: math.comb(o, i + 1))
            task.append(c)
            r -= math.comb(c, i + 1)
        return tuple(reversed(task))

class OrderedTuples(TaskUniverse):
    """k distinct options in any order: n! / (n-k)! tuples, ranked in the factorial base (digit i
    picks among the n - i options still unused), which is lexicographic order."""
    def count(self, fixed=None, avoid=()):
        free = sum(o not in avoid for o in range(self.n))
        if fixed is None:
            return math.perm(free, self.k)
        return math.perm(free - 1, self.k - 1) if fixed[1] not in avoid else 0

    def unrank(self, r):
        task, unused = [], list(range(self.n))
        for i in range(self.k):
            digit, r = divmod(r, math.perm(self.n - i - 1, self.k - i - 1))
            task.append(unused.pop(digit))
        return tuple(task)

class AllTuples(TaskUniverse):
    """Any option at every step, repeats allowed: n^k tuples, ranked in base n (lexicographic)."""
    def count(self, fixed=None, avoid=()):
        free = sum(o not in avoid for o in range(self.n))
        if fixed is None:
            return free ** self.k
        return free ** (self.k - 1) if fixed[1] not in avoid else 0

    def unrank(self, r):
        return tuple(r // self.n ** i % self.n for i in reversed(range(self.k)))

# ----------------------------------------------------------------------------- families
def require(rules):
    """Refuse settings with the error of the first (holds, error) rule they break."""
    for holds, error in rules:
        if not holds:
            raise ValueError(error)

class ARCFamily:
    """The interface of a family. A subclass's constructor takes its command-line flags as keywords
    (FLAGS: their meanings), sets `name`, `universe` (D = n_options options, T = n_steps steps),
    `input_len` (tokens of an input x), `n_answer_steps` x `tokens_per_step` (the answer with chain
    of thought; without it, the last step's tokens), and calls `super().__init__(tokens)`. Its
    sample(tasks, n_examples, generator, difficulty=1.0) gives, for tasks (B, T) and in a few
    batched tensor operations on their device, fresh inputs (B, n_examples, input_len) and their
    answers (B, n_examples, n_answer_steps, tokens_per_step). difficulty in [0, 1] is for
    curricula: 1 is the input distribution, the only one evaluation uses; 0 the easiest, if any."""
    FLAGS = {}

    def __init__(self, tokens):
        self.tokens = list(tokens) + ["<sep>"]  # the separator is a token of its own
        assert len(set(self.tokens)) == len(self.tokens), f"{self.name}: a token repeats"
        self.vocab_size, self.separator_id = len(self.tokens), len(self.tokens) - 1
        self.n_options, self.n_steps = self.universe.n, self.universe.k

    def example_len(self, cot):
        return self.input_len + 1 + (self.n_answer_steps if cot else 1) * self.tokens_per_step

@dataclass
class Batch:
    tokens: torch.Tensor  # (B, N * example_len) token ids
    answer_mask: torch.Tensor  # (N * example_len,) bool, True on answer tokens, one for all samples
    answer_len: int  # the query's answer is tokens[:, -answer_len:]
    tokens_per_step: int  # answer token j belongs to step j // tokens_per_step

def make_batch(family, tasks, n_examples, cot, generator, difficulty=1.0):
    """N examples of each task, concatenated: input tokens, separator, answer tokens. With cot the
    answer is every step y_1..y_T; without, only the last step y_T. The last example is the query
    that evaluation scores. difficulty: see ARCFamily."""
    inputs, answers = family.sample(tasks, n_examples, generator, difficulty)
    answers = (answers if cot else answers[:, :, -1:]).flatten(2)
    separator = torch.full_like(inputs[:, :, :1], family.separator_id)
    tokens = torch.cat([inputs, separator, answers], dim=2)
    is_answer = torch.arange(tokens.size(2), device=tokens.device) > inputs.size(2)
    return Batch(tokens.flatten(1), is_answer.repeat(n_examples), answers.size(2),
                 family.tokens_per_step)

class SparseParity(ARCFamily):
    """x uniform in {0,1}^d; theta = k distinct coordinates; y_t = x_theta1 xor ... xor x_thetat."""
    FLAGS = dict(d="input length: x is uniform in {0,1}^d; D = d options per step",
                 k="secret coordinates per task: the answer is the parity of k bits; T = k steps",
                 tuples="sorted: the paper's tasks, C(d,k) of them; ordered: d!/(d-k)!, the chain "
                        "of thought following the tuple's order")

    def __init__(self, d=7, k=3, tuples="ordered"):
        require([(d >= 1, f"d must be at least 1, got {d}"),
                 (1 <= k <= d, f"k must be between 1 and d={d}, got {k}"),
                 (tuples in ("sorted", "ordered"),
                  f"tuples must be sorted or ordered, got {tuples!r}")])
        self.name, self.d, self.k = "parity", d, k
        self.universe = OrderedTuples(d, k) if tuples == "ordered" else SortedTuples(d, k)
        self.input_len, self.n_answer_steps, self.tokens_per_step = d, k, 1
        super().__init__(["0", "1"])  # token id == bit value

    def sample(self, tasks, n_examples, generator, difficulty=1.0):
        B = tasks.size(0)
        x = torch.randint(0, 2, (B, n_examples, self.d), generator=generator, device=tasks.device)
        chosen = x.gather(2, tasks[:, None, :].expand(B, n_examples, self.k))
        return x, (chosen.cumsum(dim=2) % 2).unsqueeze(3)  # the prefix parities

ARITHMETIC_OPS = {"add": lambda a, b, p: (a + b) % p, "sub": lambda a, b, p: (a - b) % p,
                  "mul": lambda a, b, p: (a * b) % p, "max": lambda a, b, p: torch.maximum(a, b),
                  "min": lambda a, b, p: torch.minimum(a, b), "absdiff": lambda a, b, p: abs(a - b)}

class Arithmetic(ARCFamily):
    """x = (x_0..x_T) uniform in Z_p^(T+1); theta_t is one of D binary operations;
    y_0 = x_0 and y_t = op_theta_t(y_{t-1}, x_t) mod p. Tokens are the residues 0..p-1."""
    FLAGS = dict(ops=f"the D operations a step chooses from, of: {' '.join(ARITHMETIC_OPS)}",
                 steps_per_task="T: operations applied one after another",
                 modulus="p: inputs and answers are residues mod p")

    def __init__(self, ops=("add", "sub", "mul"), steps_per_task=6, modulus=10):
        n_steps, unknown = steps_per_task, [op for op in ops if op not in ARITHMETIC_OPS]
        require([(ops and not unknown, f"unknown operation(s) {unknown or ops}: "
                                       f"choose from {' '.join(ARITHMETIC_OPS)}"),
                 (len(set(ops)) == len(ops), f"operations repeat: {' '.join(ops)}"),
                 (n_steps >= 1, f"steps-per-task must be at least 1, got {n_steps}"),
                 (modulus >= 2, f"modulus must be at least 2, got {modulus}")])
        self.name, self.ops, self.modulus = "arithmetic", list(ops), modulus
        self.universe = AllTuples(len(ops), n_steps)
        self.input_len, self.n_answer_steps, self.tokens_per_step = n_steps + 1, n_steps, 1
        super().__init__([str(r) for r in range(modulus)])  # token id == residue

    def sample(self, tasks, n_examples, generator, difficulty=1.0):
        B, N, T, p, device = tasks.size(0), n_examples, self.n_steps, self.modulus, tasks.device
        x = torch.randint(0, p, (B, N, T + 1), generator=generator, device=device)
        if difficulty < 1:
            # Easier inputs: operands x_1..x_T in 1..largest, which grows with difficulty to p - 1.
            # Small operands make add and sub move y in opposite directions, so a step's operation
            # shows in the pair (y_(t-1), y_t) alone; uniform ones leave only the three-way check
            # y_t = y_(t-1) +- x_t, not found by training from scratch (docs/recipe.md, arithmetic).
            largest = 1 + int(difficulty * (p - 1))
            x[..., 1:] = torch.randint(1, largest + 1, (B, N, T), generator=generator, device=device)
        y, steps = x[:, :, 0], []
        for t in range(T):  # steps are sequential by definition; each is one batched op
            every_op = torch.stack([ARITHMETIC_OPS[op](y, x[:, :, t + 1], p) for op in self.ops])
            y = every_op.gather(0, tasks[None, :, None, t].expand(1, B, N)).squeeze(0)
            steps.append(y)
        return x, torch.stack(steps, dim=2).unsqueeze(3)

# The authors' multi-step translation task: ten languages, twenty meanings (named in English), each
# meaning's real word in every language. A word two languages share ("gato", "猫") is one token.
WORDS = {
    "English": "cat dog house apple sky car road tree bed water "
               "sun moon star book phone computer flower chair table mountain",
    "French": "chat chien maison pomme ciel voiture route arbre lit eau "
              "soleil lune étoile livre téléphone ordinateur fleur chaise table montagne",
    "Spanish": "gato perro casa manzana cielo coche carretera árbol cama agua "
               "sol luna estrella libro teléfono ordenador flor silla mesa montaña",
    "Chinese": "猫 狗 房子 苹果 天空 汽车 路 树 床 水 太阳 月亮 星星 书 电话 电脑 花 椅子 桌子 山",
    "German": "Katze Hund Haus Apfel Himmel Auto Straße Baum Bett Wasser "
              "Sonne Mond Stern Buch Telefon Computer Blume Stuhl Tisch Berg",
    "Italian": "gatto cane casa mela cielo macchina strada albero letto acqua "
               "sole luna stella libro telefono computer fiore sedia tavolo montagna",
    "Japanese": "猫 犬 家 りんご 空 車 道 木 ベッド 水 太陽 月 星 本 電話 コンピュータ 花 椅子 テーブル 山",
    "Russian": "кошка собака дом яблоко небо машина дорога дерево кровать вода "
               "солнце луна звезда книга телефон компьютер цветок стул стол гора",
    "Portuguese": "gato cão casa maçã céu carro estrada árvore cama água "
                  "sol lua estrela livro telefone computador flor cadeira mesa montanha",
    "Arabic": "قطة كلب بيت تفاحة سماء سيارة طريق شجرة سرير ماء "
              "شمس قمر نجمة كتاب هاتف حاسوب زهرة كرسي طاولة جبل",
}
LANGUAGES, MEANINGS = list(WORDS), WORDS["English"].split()

class Translation(ARCFamily):
    """theta = T languages (repeats allowed) from the first D; an example is one random
    meaning written as (language tag, word) in each of them. The input is step 1; the
    answer is steps 2..T: y_t = (tag of theta_t, the meaning's word in theta_t)."""
    FLAGS = dict(languages=f"D: a step translates into one of the first D of "
                           f"{', '.join(LANGUAGES)}",
                 steps_per_task="T: languages per task (repeats allowed); the query shows step 1")

    def __init__(self, languages=6, steps_per_task=6):
        require([(1 <= languages <= len(LANGUAGES),
                  f"languages must be in 1..{len(LANGUAGES)}, got {languages}"),
                 (steps_per_task >= 2, f"steps-per-task must be at least 2 (the query shows step "
                                       f"1), got {steps_per_task}")])
        self.name, self.languages = "translation", LANGUAGES[:languages]
        self.universe = AllTuples(languages, steps_per_task)
        self.input_len, self.n_answer_steps, self.tokens_per_step = 2, steps_per_task - 1, 2
        words = dict.fromkeys(w for language in self.languages for w in WORDS[language].split())
        super().__init__([f"<{language}>" for language in self.languages] + list(words))
        # (D, n_meanings) token ids of each language's words; the tags come first: tag id = language
        self.word_ids = torch.tensor([[self.tokens.index(w) for w in WORDS[language].split()]
                                      for language in self.languages])
        self.ids_on = {}  # device -> word_ids there

    def sample(self, tasks, n_examples, generator, difficulty=1.0):
        B, N, device = tasks.size(0), n_examples, tasks.device
        if device not in self.ids_on:  # copied to a device once, not at every batch
            self.ids_on[device] = self.word_ids.to(device)
        word_ids = self.ids_on[device]
        meaning = torch.randint(0, len(MEANINGS), (B, N, 1), generator=generator, device=device)
        language = tasks[:, None, :].expand(B, N, self.n_steps)
        steps = torch.stack([language, word_ids[language, meaning]], dim=3)  # (B, N, T, 2)
        return steps[:, :, 0], steps[:, :, 1:]
