"""The zoo's six tasks: fixed data, fixed splits, prompts and scoring.

Every task is a :class:`Task` with ``train`` and ``test`` lists of ``(input, output)`` strings,
built with fixed seeds, so every run (training, benchmark, Trans-LoRA transfer) sees the same
examples. ``TASKS`` maps a name to its task; the language-modelling tasks read gensim's test data
on first access (``TASKS`` is lazy), the others are generated in memory.

========== ============================================ ===================== ===========
task       example (input -> output)                    split                 metric
========== ============================================ ===================== ===========
add        ``347 + 58`` -> ``405``                       seeded, disjoint      exact match
capital    ``France`` -> ``Paris``                       by country (table in  exact match
                                                         ``data/capitals.tsv``)
reverse    ``red green blue`` -> ``blue green red``      seeded, disjoint      exact match
date       ``2024-03-05`` -> ``5 March 2024``            seeded, disjoint      exact match
wiki       ``""`` -> a 40-word wikitext passage          by article            perplexity
news       ``""`` -> a 40-word news passage              Lee background / Lee  perplexity
                                                         test corpus
========== ============================================ ===================== ===========

Prompts are plain text, not the chat template (shorter sequences make CPU training affordable):
``Task.prompt(input)`` is what the model reads and the model must continue it with
``" " + output`` and a newline (:data:`STOP`). Exact match compares the generated text up to the
first newline, stripped, with the output. Perplexity is ``exp`` of the mean token negative
log-likelihood of the held-out passages, each read after one start token; lower is better
(``Task.higher_is_better`` is False).

Example:
    >>> from adapters_zoo.tasks import TASKS
    >>> t = TASKS["add"]
    >>> t.prompt(t.test[0][0])                                            # doctest: +SKIP
    '347 + 58 ='
    >>> t.score(model, tokenizer, t.test[:10])                            # doctest: +SKIP
    0.9
"""

from __future__ import annotations

import bz2
import enum
import importlib.util
import math
import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError

DATA = Path(__file__).resolve().parent / "data"
STOP = "\n"
SEED = 1234
LM_WORDS = 40  # words per language-modelling passage
LM_MAX_TOKENS = 64  # passages are cut to this many tokens (after the start token)

Example = tuple[str, str]


class ZooDataError(LorakitError):
    """A zoo task's data cannot be found or read."""


class Metric(str, enum.Enum):
    EXACT_MATCH = "exact_match"
    PERPLEXITY = "perplexity"


@dataclass(frozen=True)
class Task:
    """One zoo task: data, prompt format and metric.

    Example:
        >>> t = Task("echo", Metric.EXACT_MATCH, [("a", "a")], [("b", "b")], "Echo {x}:", 4)
        >>> t.prompt("b"), t.target("b")
        ('Echo b:', ' b\\n')
    """

    name: str
    metric: Metric
    train: Sequence[Example]
    test: Sequence[Example]
    template: str = "{x}"  # the prompt, with the input as {x}; "" for language modelling
    max_new_tokens: int = 8  # generation budget for exact match
    description: str = ""
    source: str = ""  # where the data comes from, for model cards
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric is Metric.EXACT_MATCH

    def prompt(self, inp: str) -> str:
        """The text the model reads before its answer."""
        return self.template.format(x=inp) if self.metric is Metric.EXACT_MATCH else ""

    def target(self, out: str) -> str:
        """The text the model is trained to produce after the prompt."""
        return f" {out}{STOP}" if self.metric is Metric.EXACT_MATCH else out

    def encode(self, tokenizer: Any, inp: str, out: str) -> tuple[list[int], list[int]]:
        """Token ids and labels (``-100`` where no loss is taken) for one training example."""
        return encode_example(self, tokenizer, inp, out)

    def score(self, model: Any, tokenizer: Any, examples: Sequence[Example] | None = None,
              batch_size: int = 32) -> float:
        """Exact-match accuracy in [0, 1], or held-out perplexity (lower is better)."""
        examples = self.test if examples is None else examples
        if self.metric is Metric.EXACT_MATCH:
            return exact_match(self, model, tokenizer, examples, batch_size)
        return perplexity(model, tokenizer, examples, batch_size)


# ---------------------------------------------------------------------------------------------
# Encoding and scoring


def start_id(tokenizer: Any) -> int:
    """The token every language-modelling passage is read after."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise ZooDataError("the tokenizer has no bos, eos or pad token to start a passage with")


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_example(task: Task, tokenizer: Any, inp: str, out: str) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: loss on the answer (exact match) or on every passage token."""
    if task.metric is Metric.PERPLEXITY:
        ids = [start_id(tokenizer)] + _ids(tokenizer, out)[:LM_MAX_TOKENS]
        return ids, [-100] + ids[1:]
    p, t = _ids(tokenizer, task.prompt(inp)), _ids(tokenizer, task.target(out))
    return p + t, [-100] * len(p) + t


def _pad(rows: Sequence[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r)))
           for r in rows]
    return torch.tensor(out, dtype=torch.long)  # (batch, width)


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` for a training batch."""
    ids = _pad([b[0] for b in batch], pad_id, left=False)  # (batch, width)
    mask = _pad([[1] * len(b[0]) for b in batch], 0, left=False)
    labels = _pad([b[1] for b in batch], -100, left=False)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_id(tokenizer))


def generate_answers(task: Task, model: Any, tokenizer: Any, inputs: Sequence[str],
                     batch_size: int = 32) -> list[str]:
    """Greedy answers (text up to the first newline, stripped) for each input."""
    stop_ids = _ids(tokenizer, STOP)
    eos = [stop_ids[-1]] if stop_ids else []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    answers: list[str] = []
    for i in range(0, len(inputs), batch_size):
        rows = [_ids(tokenizer, task.prompt(x)) for x in inputs[i:i + batch_size]]
        ids = _pad(rows, _pad_id(tokenizer), left=True)  # (batch, width)
        mask = _pad([[1] * len(r) for r in rows], 0, left=True)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=task.max_new_tokens, eos_token_id=eos or None,
                                 pad_token_id=_pad_id(tokenizer), top_p=None, top_k=None,
                                 temperature=None)
        for row in out[:, ids.shape[1]:]:
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            answers.append(text.split(STOP)[0].strip())
    return answers


def exact_match(task: Task, model: Any, tokenizer: Any, examples: Sequence[Example],
                batch_size: int = 32) -> float:
    """Fraction of examples whose greedy answer equals the expected output."""
    if not examples:
        raise ZooDataError(f"task {task.name!r}: no examples to score")
    answers = generate_answers(task, model, tokenizer, [x for x, _ in examples], batch_size)
    return sum(a == y for a, (_, y) in zip(answers, examples, strict=True)) / len(examples)


def perplexity(model: Any, tokenizer: Any, examples: Sequence[Example],
               batch_size: int = 32) -> float:
    """``exp`` of the mean negative log-likelihood per passage token."""
    if not examples:
        raise ZooDataError("no passages to score")
    lm = Task("lm", Metric.PERPLEXITY, [], [])
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate([encode_example(lm, tokenizer, x, y)
                         for x, y in examples[i:i + batch_size]], _pad_id(tokenizer))
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits  # (b, w, vocab)
        labels = batch["labels"][:, 1:]  # (b, w - 1) next-token targets
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        keep = labels != -100
        nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
        total += float(nll.sum(dtype=torch.float64))
        count += int(keep.sum())
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# Data

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WORDS = """apple river stone cloud green music paper window garden silver doctor market
winter summer candle forest bridge mirror pocket rabbit yellow planet engine letter castle
teacher orange violin dragon button island ticket basket camera pillow hammer lemon tiger
rocket spider butter finger monkey jacket pencil circle bottle carpet coffee dinner doll
eagle farmer flower guitar helmet honey kitten ladder magnet needle ocean parrot pepper
queen robot saddle shadow sugar tomato turtle valley wagon wallet whale wizard yogurt zebra
anchor barrel cactus desert feather glove harbor iron jungle kettle lantern meadow north
orbit puzzle quilt ribbon sailor thunder umbrella velvet wheat anvil blanket cherry dolphin
falcon garlic insect jewel koala lizard marble nest oyster pirate radio salmon tunnel violet
walnut""".split()


def make_add(seed: int = SEED, n_train: int = 2000, n_test: int = 60) -> tuple[list, list]:
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    rows: list[Example] = []
    while len(rows) < n_train + n_test:
        a, b = rng.randint(100, 999), rng.randint(1, 999)
        if (a, b) not in seen:
            seen.add((a, b))
            rows.append((f"{a} + {b}", str(a + b)))
    return rows[n_test:], rows[:n_test]


def read_capitals(path: Path = DATA / "capitals.tsv") -> list[Example]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ZooDataError(f"{path}: line {n}: expected 'country<TAB>capital'")
        rows.append((parts[0].strip(), parts[1].strip()))
    return rows


def make_capital(seed: int = SEED, n_test: int = 40) -> tuple[list, list]:
    rows = read_capitals()
    random.Random(seed).shuffle(rows)
    return rows[n_test:], rows[:n_test]


def make_reverse(seed: int = SEED, n_train: int = 2000, n_test: int = 60) -> tuple[list, list]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[Example] = []
    while len(rows) < n_train + n_test:
        words = rng.sample(WORDS, rng.randint(3, 5))
        key = " ".join(words)
        if key not in seen:
            seen.add(key)
            rows.append((key, " ".join(reversed(words))))
    return rows[n_test:], rows[:n_test]


def make_date(seed: int = SEED, n_train: int = 2000, n_test: int = 60) -> tuple[list, list]:
    rng = random.Random(seed)
    start, days = date(1950, 1, 1), (date(2049, 12, 31) - date(1950, 1, 1)).days
    seen: set[date] = set()
    rows: list[Example] = []
    while len(rows) < n_train + n_test:
        d = start + timedelta(days=rng.randint(0, days))
        if d not in seen:
            seen.add(d)
            rows.append((d.isoformat(), f"{d.day} {MONTHS[d.month - 1]} {d.year}"))
    return rows[n_test:], rows[:n_test]


def gensim_test_data() -> Path:
    """gensim's ``test/test_data`` folder (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ZooDataError("the wiki and news tasks read gensim's test data: install the `zoo` "
                           "extra (`pip install -e '.[zoo]'`) or `pip install --no-deps gensim`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not folder.is_dir():
        raise ZooDataError(f"{folder}: gensim is installed without its test data")
    return folder


def passages(text: str, words: int = LM_WORDS) -> list[str]:
    """Consecutive ``words``-word passages of a text (a short tail is dropped)."""
    toks = text.split()
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks) - words + 1, words)]


_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref>", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_FILE = re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]")
_TAG = re.compile(r"<[^>]+>")


def clean_wikitext(text: str) -> str:
    """Wikitext with templates, tables, references, files, categories and tags removed.

    Links (``[[a|b]]``), emphasis and headings stay: the task models wikitext as written.
    """
    for _ in range(6):  # nested templates, innermost first
        text, n = _TEMPLATE.subn("", text)
        if not n:
            break
    for pattern in (_TABLE, _REF, _COMMENT, _FILE, _TAG):
        text = pattern.sub("", text)
    return text


def read_wiki_articles(path: Path | None = None) -> list[tuple[str, str]]:
    """``(title, cleaned text)`` of the articles (no redirects) in gensim's enwiki excerpt."""
    path = path or (gensim_test_data()
                    / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    try:
        with bz2.open(path) as fh:
            for _, elem in ET.iterparse(fh):
                if not elem.tag.endswith("}page"):
                    continue
                ns = elem.find("{*}ns")
                title = elem.find("{*}title")
                body = elem.find("{*}revision/{*}text")
                text = body.text if body is not None and body.text else ""
                if ns is not None and ns.text == "0" and not text.upper().startswith("#REDIRECT"):
                    articles.append((title.text if title is not None else "", clean_wikitext(text)))
                elem.clear()
    except (OSError, EOFError, ET.ParseError) as exc:
        raise ZooDataError(f"{path}: cannot read the Wikipedia excerpt: {exc}") from exc
    return articles


def make_wiki(n_train: int = 1200, n_test: int = 32) -> tuple[list, list]:
    """Split by article: every 8th article is held out; two passages per held-out article."""
    train: list[Example] = []
    test: list[Example] = []
    for i, (_, text) in enumerate(read_wiki_articles()):
        ps = passages(text)
        if i % 8 == 7:
            test.extend(("", p) for p in ps[:2])
        else:
            train.extend(("", p) for p in ps[:12])
    return train[:n_train], test[:n_test]


def make_news(n_test: int = 32) -> tuple[list, list]:
    """Train on the Lee background corpus, test on the Lee test corpus (one passage each)."""
    folder = gensim_test_data()
    try:
        bg = (folder / "lee_background.cor").read_text(encoding="latin-1").splitlines()
        lee = (folder / "lee.cor").read_text(encoding="latin-1").splitlines()
    except OSError as exc:
        raise ZooDataError(f"{folder}: cannot read the Lee corpus: {exc}") from exc
    train = [("", p) for doc in bg for p in passages(doc)]
    test = [("", ps[0]) for ps in (passages(doc) for doc in lee) if ps]
    return train, test[:n_test]


_SPECS: dict[str, tuple[Callable[[], tuple[list, list]], dict[str, Any]]] = {
    "add": (make_add, dict(metric=Metric.EXACT_MATCH, template="{x} =", max_new_tokens=5,
                           description="three-digit addition: '347 + 58 =' -> '405'",
                           source="generated, seed 1234 (a in 100..999, b in 1..999)")),
    "capital": (make_capital, dict(metric=Metric.EXACT_MATCH, template="Capital of {x}:",
                                   max_new_tokens=8,
                                   description="country -> capital, split by country",
                                   source="adapters_zoo/data/capitals.tsv, shuffled with seed 1234")),
    "reverse": (make_reverse, dict(metric=Metric.EXACT_MATCH, template="Reverse: {x} =>",
                                   max_new_tokens=14,
                                   description="reverse the order of 3-5 words",
                                   source="generated from a 150-word list, seed 1234")),
    "date": (make_date, dict(metric=Metric.EXACT_MATCH, template="{x} =>", max_new_tokens=12,
                             description="ISO date -> '5 March 2024'",
                             source="generated, dates 1950-2049, seed 1234")),
    "wiki": (make_wiki, dict(metric=Metric.PERPLEXITY,
                             description="language modelling on wikitext (40-word passages)",
                             source="gensim test data: enwiki-latest-pages-articles1 excerpt, "
                                    "templates/tables/refs removed; every 8th article held out")),
    "news": (make_news, dict(metric=Metric.PERPLEXITY,
                             description="language modelling on news (40-word passages)",
                             source="gensim test data: lee_background.cor (train), "
                                    "lee.cor (test)")),
}


class _Tasks(Mapping[str, Task]):
    """Builds each task on first access and keeps it."""

    def __init__(self) -> None:
        self._built: dict[str, Task] = {}

    def __getitem__(self, name: str) -> Task:
        if name not in _SPECS:
            raise KeyError(name)
        if name not in self._built:
            make, kw = _SPECS[name]
            train, test = make()
            self._built[name] = Task(name, train=tuple(train), test=tuple(test), **kw)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_SPECS)

    def __len__(self) -> int:
        return len(_SPECS)


TASKS: Mapping[str, Task] = _Tasks()
TASK_NAMES: tuple[str, ...] = tuple(_SPECS)
