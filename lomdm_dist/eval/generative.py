"""Generative perplexity of sampled text under an autoregressive judge, and unigram entropy.

Generative perplexity (gen-PPL) is the perplexity that a separate, pretrained autoregressive model
(the *judge*, GPT-2 Large by default) assigns to generated text. It measures fluency, not
likelihood under the data, and a sampler can lower it by collapsing onto a few repeated tokens;
hence every number here comes with the sample's unigram entropy, whose drop reveals that collapse.

The protocol follows MDLM / BD3LM (``compute_generative_perplexity``), so numbers compare with
theirs:

* the sample's *text* is retokenised with the judge's own tokenizer (its default special tokens,
  none for GPT-2), because the sampler's vocabulary need not be the judge's;
* the sample is kept up to and including its first end-of-text token at index >= 1: what follows
  a document's end is another document, which the judge cannot be asked to predict from the first.
  An end-of-text token at index 0 is context only (a sample may open with a document separator).
  (MDLM's code masks with ``first_eos | not_eos``, which in fact also scores the non-EOS tokens
  after the first EOS; here they are dropped, as the protocol is described.)
* the kept tokens are cut into consecutive, non-overlapping windows of the judge's context (1,024
  tokens for GPT-2), each fed on its own starting at position 0; in each window every token after
  the first is scored given the tokens before it in that window. A token that starts a window is
  therefore never scored: it is context only, having no earlier token in its window. That includes
  the first EOS when it falls at index k * context (it starts a one-token window, which scores
  nothing). Per sample, ``context_tokens`` counts these window starts, so ``tokens_scored =
  kept_tokens - context_tokens``; ``samples_eos_unscored`` counts the samples whose first EOS is one.
* MDLM retokenises with ``truncation=True, max_length=model.length`` (1,024 for OWT), so it scores
  at most that many judge tokens of a sample; here the whole kept text is scored, in as many windows
  as it takes (a sample whose retokenisation is longer than the model's length differs).
* the headline number is token-weighted: ``exp(sum of NLLs / number of scored tokens)`` over all
  samples (MDLM's ``gen_ppl`` metric); the mean of per-sample perplexities is reported beside it.

Unigram entropy (nats) is that of the sample's own token ids (the ``tokens`` field a samples file
carries, the same quantity as its ``entropy`` field), or of the judge's ids when a line has no
``tokens``.

Windows of all samples are scored in batches, right-padded with an attention mask; sums are in
float64. The judge runs in float32.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..train.samples import unigram_entropy

DEFAULT_JUDGE = "gpt2-large"
FALLBACK_CONTEXT = 1024
"""Window length when the judge's config names no context length (GPT-2's)."""


class SamplesFileError(ValueError):
    """A samples file is missing, unreadable, empty, or has a line without a ``text`` string."""


class JudgeNotFound(ValueError):
    """The judge is neither a local directory nor in the Hugging Face cache, nor downloadable."""


# ------------------------------------------------------------------------------------------------
# Reading samples


@dataclass(frozen=True)
class SampleLine:
    line: int
    """1-based line number in the samples file (blank lines are skipped, not renumbered)."""
    text: str
    tokens: list[int] | None
    """The sampler's token ids, when the line carries a ``tokens`` list of integers."""


def read_samples(path: str | os.PathLike) -> list[SampleLine]:
    """The samples of a JSON-lines file (``tools/sample.py`` output): each line an object with a
    ``text`` string and optionally ``tokens``; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise SamplesFileError(f"samples file {path}: no such file")
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SamplesFileError(f"samples file {path}: cannot be read ({err})") from None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SamplesFileError(f"samples file {path} line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SamplesFileError(f"samples file {path} line {number}: no 'text' string field")
        tokens = record.get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)):
            tokens = None
        samples.append(SampleLine(line=number, text=record["text"], tokens=tokens))
    if not samples:
        raise SamplesFileError(f"samples file {path}: holds no samples")
    return samples


# ------------------------------------------------------------------------------------------------
# The judge


@dataclass
class Judge:
    model: torch.nn.Module
    tokenizer: object
    """A ``transformers`` tokenizer (callable on a list of strings)."""
    name: str
    context: int
    eos_id: int | None
    device: torch.device


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_pretrained(name: str, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only)
    return model, tokenizer


def load_judge(name_or_path: str = DEFAULT_JUDGE, *, device: str | torch.device = "cpu",
               offline: bool = False) -> Judge:
    """The judge model and tokenizer from a local directory or a Hugging Face Hub name.

    A Hub name is looked up in the local cache first, so a cached judge never touches the network;
    only when it is absent (and neither ``offline`` nor ``HF_HUB_OFFLINE`` is set) is it downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise JudgeNotFound(f"judge {name_or_path}: not a model directory (expected a config.json "
                                "as written by save_pretrained)")
        try:
            model, tokenizer = _from_pretrained(str(path), local_only=True)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise JudgeNotFound(f"judge {name_or_path}: cannot load the model or tokenizer ({reason})") from None
    elif name_or_path.startswith(("/", "./", "../", "~")):
        raise JudgeNotFound(f"judge {name_or_path}: no such directory")
    else:
        try:
            model, tokenizer = _from_pretrained(name_or_path, local_only=True)
        except (OSError, ValueError):
            if offline or _hub_offline():
                from huggingface_hub.constants import HF_HUB_CACHE

                raise JudgeNotFound(
                    f"judge {name_or_path!r}: not a local directory and not in the Hugging Face cache "
                    f"({HF_HUB_CACHE}), and downloads are off. Fetch it where there is network (`hf download "
                    f"{name_or_path}`, then copy the cache) or pass --judge DIR") from None
            print(f"judge {name_or_path!r} is not in the local cache: downloading it from the Hugging Face Hub",
                  file=sys.stderr)
            try:
                model, tokenizer = _from_pretrained(name_or_path, local_only=False)
            except (OSError, ValueError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise JudgeNotFound(f"judge {name_or_path!r}: not a local directory, not in the Hugging Face "
                                    f"cache, and the download failed (offline?): {reason}") from None
    config = model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    device = torch.device(device)
    model = model.to(device=device, dtype=torch.float32).eval()
    return Judge(model=model, tokenizer=tokenizer, name=name_or_path, context=int(context or FALLBACK_CONTEXT),
                 eos_id=tokenizer.eos_token_id, device=device)


# ------------------------------------------------------------------------------------------------
# Scoring


def truncate_at_eos(ids: Sequence[int], eos_id: int | None) -> tuple[list[int], bool]:
    """``ids`` up to and including the first end-of-text token at index >= 1, and whether one was
    found (index 0 is never scored, so an EOS there is context, not an end)."""
    ids = list(ids)
    if eos_id is not None:
        for i in range(1, len(ids)):
            if ids[i] == eos_id:
                return ids[: i + 1], True
    return ids, False


def split_windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive, non-overlapping windows of at most ``window`` tokens (the last may be shorter)."""
    if window < 2:
        raise ValueError(f"split_windows: a window needs at least 2 tokens, got {window}")
    return [list(ids[i:i + window]) for i in range(0, len(ids), window)]


@dataclass
class SampleScore:
    line: int
    nll_sum: float
    """Sum of the judge's negative log-likelihoods (nats) over the scored tokens."""
    tokens_scored: int
    judge_tokens: int
    """Judge tokens of the text before truncation at the first EOS."""
    kept_tokens: int
    """Judge tokens up to and including the first EOS (all of them when there is none)."""
    context_tokens: int
    """Kept tokens that start a window and so are context only: ``kept_tokens - tokens_scored``."""
    eos_truncated: bool
    eos_scored: bool
    """Whether the first EOS was scored (False without one, or when it starts a window)."""
    entropy: float
    entropy_of: str
    """``sample`` (the sampler's token ids) or ``judge`` (the retokenised ids, for lines without tokens)."""

    @property
    def gen_ppl(self) -> float | None:
        return math.exp(self.nll_sum / self.tokens_scored) if self.tokens_scored else None


@dataclass
class GenerativeReport:
    judge: str
    context: int
    num_samples: int
    tokens_scored: int
    gen_ppl: float | None
    """Token-weighted over all samples: exp(total NLL / total scored tokens) (MDLM's metric)."""
    mean_sample_gen_ppl: float | None
    """Mean of the per-sample perplexities over samples with at least one scored token."""
    mean_entropy: float
    samples_truncated_at_eos: int
    samples_eos_unscored: int
    """Samples cut at a first EOS that starts a window, so that EOS is context only, not scored."""
    unscored_samples: int
    samples: list[SampleScore] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["samples"] = [{**asdict(s), "gen_ppl": s.gen_ppl} for s in self.samples]
        return out


@torch.inference_mode()
def _window_nlls(judge: Judge, windows: list[list[int]]) -> list[tuple[float, int]]:
    """(sum of NLLs, scored tokens) of each window, every token after the first scored."""
    width = max(len(w) for w in windows)
    ids = torch.zeros((len(windows), width), dtype=torch.long)
    attention = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, :len(window)] = torch.tensor(window, dtype=torch.long)
        attention[row, :len(window)] = 1
    ids, attention = ids.to(judge.device), attention.to(judge.device)
    logits = judge.model(input_ids=ids, attention_mask=attention).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    scored = attention[:, 1:].bool()
    sums = torch.where(scored, nll, torch.zeros_like(nll)).double().sum(dim=1)
    return list(zip(sums.tolist(), scored.sum(dim=1).tolist()))


def generative_perplexity(judge: Judge, samples: Sequence[SampleLine], *, batch_size: int = 8,
                          progress: bool = False) -> GenerativeReport:
    """Score ``samples`` under ``judge`` (see the module docstring for the protocol)."""
    if batch_size <= 0:
        raise ValueError(f"generative_perplexity: batch_size must be positive, got {batch_size}")
    if not samples:
        raise ValueError("generative_perplexity: no samples")
    encoded = judge.tokenizer([s.text for s in samples], verbose=False)["input_ids"]
    scores, windows, owner = [], [], []
    for index, (sample, ids) in enumerate(zip(samples, encoded)):
        kept, truncated = truncate_at_eos(ids, judge.eos_id)
        entropy_ids, entropy_of = (sample.tokens, "sample") if sample.tokens is not None else (list(ids), "judge")
        sample_windows = split_windows(kept, judge.context)
        scores.append(SampleScore(line=sample.line, nll_sum=0.0, tokens_scored=0, judge_tokens=len(ids),
                                  kept_tokens=len(kept), context_tokens=len(sample_windows),
                                  eos_truncated=truncated,
                                  eos_scored=truncated and (len(kept) - 1) % judge.context != 0,
                                  entropy=unigram_entropy(entropy_ids), entropy_of=entropy_of))
        for window in sample_windows:
            if len(window) >= 2:                 # a one-token window has nothing to score
                windows.append(window)
                owner.append(index)
    # Longest first: a batch pads to its longest window, so similar lengths waste the least compute.
    by_length = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    from tqdm.auto import tqdm

    batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    for batch in tqdm(batches, desc="gen-ppl", unit="batch", disable=not progress, file=sys.stderr):
        for i, (nll_sum, count) in zip(batch, _window_nlls(judge, [windows[i] for i in batch])):
            scores[owner[i]].nll_sum += nll_sum
            scores[owner[i]].tokens_scored += int(count)
    total_nll = sum(s.nll_sum for s in scores)
    total_tokens = sum(s.tokens_scored for s in scores)
    per_sample = [s.gen_ppl for s in scores if s.tokens_scored]
    return GenerativeReport(
        judge=judge.name, context=judge.context, num_samples=len(scores), tokens_scored=total_tokens,
        gen_ppl=math.exp(total_nll / total_tokens) if total_tokens else None,
        mean_sample_gen_ppl=sum(per_sample) / len(per_sample) if per_sample else None,
        mean_entropy=sum(s.entropy for s in scores) / len(scores),
        samples_truncated_at_eos=sum(s.eos_truncated for s in scores),
        samples_eos_unscored=sum(s.eos_truncated and not s.eos_scored for s in scores),
        unscored_samples=len(scores) - len(per_sample), samples=scores)
