"""What a λ scan measures at each λ (docs/design.md §8): evaluation sets read and tokenised (`load_examples`,
`load_prompts`), NLL per scored token (`mean_nll`, `nll_sums`), greedy continuations (`generate_greedy`) and their
repetition and diversity (`rep_n`, `mean_rep_n`, `distinct_n`). Imports torch only; transformers when generating."""

from __future__ import annotations

import copy
import inspect
import io
import json
import math
import os
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extsub_kernels.errors import InputError
from extsub_kernels.io.files import read_bounded_text
from extsub_kernels.lambda_scan.rendering import ChatTemplate, encode_completion, encode_prompt

MAX_SET_BYTES = 1 << 28  # an evaluation set (KEEP, FORGET, PROMPTS) is text, read whole: 256 MiB at most


@dataclass(frozen=True)
class Example:
    """One evaluation sequence: token ids, scored (predicted from tokens < t) for max(n_context, 1) ≤ t < len;
    `source` names the file and line, for error messages."""

    input_ids: tuple[int, ...]
    n_context: int = 1
    source: str = "<example>"

    @property
    def n_scored(self) -> int:
        """How many tokens of this example are scored."""
        return max(len(self.input_ids) - max(self.n_context, 1), 0)


# Loading evaluation sets

_KINDS = (("text",), ("prompt", "completion"), ("input_ids",), ("prompt_ids", "completion_ids"))


def load_examples(path: str | Path, tokenizer: Any = None, chat: ChatTemplate | None = None) -> list[Example]:
    """Read an evaluation set and tokenise it.

    Args:
        path: a `.txt` file (one text per non-blank line) or a `.jsonl` file, one JSON object per non-blank
            line with exactly one of: `text`; `prompt` and `completion`; `input_ids`; `prompt_ids` and
            `completion_ids`. Other keys are ignored.
        tokenizer: a `transformers` tokenizer, needed for text (with its special tokens); a prompt and its
            completion as `rendering` says. Only the completion's tokens are scored.
        chat: render prompts through the tokenizer's chat template (`rendering.ChatTemplate`).

    Returns:
        The examples, in file order, each with at least one scored token.

    Raises:
        InputError: naming the file (and line): missing, unreadable, an unknown extension, empty, bad JSON,
            none or several kinds, bad token ids, nothing to score, or text without a tokenizer.
    """
    path = Path(path)
    examples = []
    for source, record in read_records(path, "text"):
        example = _example(record, tokenizer, chat, source)
        if example.n_scored == 0:
            raise InputError(
                f"{source}: nothing to score ({len(example.input_ids)} tokens, {example.n_context} of context); "
                "an example needs at least one token after its first (or after its prompt)"
            )
        examples.append(example)
    if not examples:
        raise InputError(f"{path}: no examples (the file has no non-blank line)")
    return examples


def load_prompts(path: str | Path, tokenizer: Any = None) -> list[str] | list[tuple[int, ...]]:
    """Read the prompts whose greedy continuations are scored (rep-n, distinct-n).

    Args:
        path: `.txt` (a prompt per non-blank line) or `.jsonl` with `prompt` (text) or `prompt_ids` on every line.
        tokenizer: needed for text prompts (they are tokenised when generating).

    Returns:
        The prompts in file order: strings, or tuples of token ids.

    Raises:
        InputError: naming the file (and line): missing, no prompts, a line without one, text mixed with token
            ids, or text without a tokenizer.
    """
    path = Path(path)
    prompts: list = []
    for source, record in read_records(path, "prompt"):
        if not isinstance(record, dict) or ("prompt" in record) == ("prompt_ids" in record):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"{source}: expected exactly one of prompt (text) or prompt_ids; found {found}")
        if "prompt_ids" in record:
            prompt: str | tuple[int, ...] = token_ids(record["prompt_ids"], "prompt_ids", source)
            if not prompt:
                raise InputError(f"{source}: 'prompt_ids' is empty; a prompt needs at least one token")
        else:
            prompt = record["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{source}: 'prompt' must be a non-empty string")
        if prompts and isinstance(prompt, str) != isinstance(prompts[0], str):
            raise InputError(f"{source}: mixes text prompts and prompt_ids in one file; use one kind")
        if isinstance(prompt, str) and tokenizer is None:
            raise InputError(
                f"{source}: the prompt is text, but there is no tokenizer (the model folder has none); "
                "give pre-tokenised prompt_ids in a .jsonl file instead"
            )
        prompts.append(prompt)
    if not prompts:
        raise InputError(f"{path}: no prompts (the file has no non-blank line)")
    return prompts


def read_records(path: Path, text_key: str) -> Iterator[tuple[str, object]]:
    """(where, record) per non-blank line of a .txt (record {text_key: line}) or .jsonl file; InputErrors name it."""
    if path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"{path}: unknown evaluation set format {path.suffix!r}; expected .txt or .jsonl")
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such file")
    text = read_bounded_text(path, "evaluation set", MAX_SET_BYTES)
    lines = io.StringIO(text, newline=None).readlines()  # lines as a text-mode file reads them
    for number, line in enumerate(lines, start=1):
        if line.strip():
            source = f"{path} line {number}"
            yield source, {text_key: line.rstrip("\r\n")} if path.suffix == ".txt" else _json_line(line, source)


def _json_line(line: str, source: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None


def _example(record: object, tokenizer: Any, chat: ChatTemplate | None, source: str) -> Example:
    if not isinstance(record, dict):
        raise InputError(f"{source}: expected a JSON object, found {type(record).__name__}")
    kinds = [kind for kind in _KINDS if any(key in record for key in kind)]
    if len(kinds) != 1 or any(key not in record for key in kinds[0]):
        expected = "; ".join(" + ".join(kind) for kind in _KINDS)
        raise InputError(f"{source}: expected exactly one of ({expected}); found keys {sorted(record)}")
    kind = kinds[0]
    if kind[0] in ("input_ids", "prompt_ids"):
        parts = [token_ids(record[key], key, source) for key in kind]
        context = parts[0] if len(parts) == 2 else ()
        return Example(context + parts[-1], len(context) if len(parts) == 2 else 1, source)
    texts = [record[key] for key in kind]
    for key, value in zip(kind, texts, strict=False):
        if not isinstance(value, str):
            raise InputError(f"{source}: {key!r} must be a string, found {type(value).__name__}")
    if tokenizer is None:
        raise InputError(
            f"{source}: {' + '.join(kind)} is text, but there is no tokenizer (the model folder has none); "
            "give pre-tokenised input_ids (or prompt_ids + completion_ids) in a .jsonl file instead"
        )
    if len(texts) == 1:
        return Example(tuple(tokenizer(texts[0])["input_ids"]), 1, source)
    prompt = encode_prompt(tokenizer, texts[0], chat)
    return Example(prompt + encode_completion(tokenizer, texts[1]), len(prompt), source)


def token_ids(value: object, key: str, source: str) -> tuple[int, ...]:
    """`value` as token ids, or an InputError naming `source` and `key` if it is not a list of non-negative ints."""
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise InputError(f"{source}: {key!r} must be a list of non-negative integer token ids")
    return tuple(value)


# Negative log-likelihood


def mean_nll(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 8, device: str | torch.device | None = None
) -> float:
    """Mean negative log-likelihood (nats) per scored token of `examples` (`nll_sums`).

    Args:
        model: a causal LM taking `input_ids` and `attention_mask`, returning `.logits` (transformers or PEFT).
        examples: from `load_examples`.
        batch_size: examples per forward pass.
        device: where the inputs go (the model must be there already); default: the model's device.

    Returns:
        Σ NLL / number of scored tokens.
    """
    if not examples:
        raise ValueError("mean_nll: no examples")
    return float(nll_sums(model, examples, batch_size, device).sum()) / sum(e.n_scored for e in examples)


def nll_sums(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 8, device: str | torch.device | None = None
) -> torch.Tensor:
    """Each example's total negative log-likelihood (nats) of its scored tokens, float64, in the examples' order.

    The one scoring pass of the scan (KEEP, FORGET, options): longest first, right-padded with a mask,
    `batch_size` at a time, in the model's dtype (the scored logits upcast to ≥ float32, sums in float64), in
    eval mode without gradients. Where the model takes `logits_to_keep` and a KV cache, the context every
    example starts with runs once for the set, and the output layer only from a batch's first scored position."""
    if batch_size < 1:
        raise ValueError(f"nll_sums: batch_size must be ≥ 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    for e in examples:
        check_ids_fit(model, e.input_ids, e.source)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    sums = torch.zeros(len(examples), dtype=torch.float64, device=device)
    trims = keeps_logits(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shared, prefix = _shared_prefix(model, examples, device) if trims else (0, None)
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                batch = [examples[i] for i in indices]
                width = max(len(e.input_ids) for e in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)  # scored[j, t-1]: token t
                for j, e in enumerate(batch):
                    input_ids[j, : len(e.input_ids)] = torch.tensor(e.input_ids)
                    mask[j, : len(e.input_ids)] = 1
                    scored[j, max(e.n_context, 1) - 1 : len(e.input_ids) - 1] = True
                owner = torch.tensor(indices)[:, None].expand(-1, width - 1)[scored].to(device)
                input_ids, mask, scored = input_ids.to(device), mask.to(device), scored.to(device)
                first = min(max(e.n_context, 1) - 1 for e in batch)  # the first position whose logits are scored
                keep = {"logits_to_keep": width - first} if first > 0 and trims else {}
                if prefix is not None:  # the shared prefix's keys and values, computed once for the whole set
                    cache = copy.deepcopy(prefix)
                    cache.batch_repeat_interleave(len(batch))
                    keep["past_key_values"] = cache
                    output = model(input_ids=input_ids[:, shared:], attention_mask=mask, use_cache=True, **keep)
                else:
                    output = model(input_ids=input_ids, attention_mask=mask, **keep)
                rows = _logits(output)[:, -(width - first) : -1][scored[:, first:]]
                rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
                losses = torch.nn.functional.cross_entropy(rows, input_ids[:, 1:][scored], reduction="none")
                sums.index_add_(0, owner, losses.double())
    finally:
        model.train(was_training)
    return sums


# A set whose examples all begin with this many context tokens or more (a chat template's system message and
# turn header) has them computed once: below it, the saving is smaller than the cache's copy per batch.
MIN_SHARED_PREFIX = 8


def _shared_prefix(model: torch.nn.Module, examples: Sequence[Example], device: torch.device) -> tuple[int, Any]:
    """(P, the KV cache of the P ≥ MIN_SHARED_PREFIX unscored tokens every example starts with), else (0, None)."""
    if _is_prefix_tuned(model):
        return 0, None
    first = examples[0].input_ids
    shared = min(max(e.n_context, 1) - 1 for e in examples)  # the prefix ends before the first scored logits
    for e in examples[1:]:
        shared = min(shared, len(e.input_ids))
        while shared and e.input_ids[:shared] != first[:shared]:
            shared = next(k for k in range(shared) if e.input_ids[k] != first[k])
    if shared < MIN_SHARED_PREFIX:
        return 0, None
    ids = torch.tensor([first[:shared]], device=device)
    return shared, model(input_ids=ids, use_cache=True).past_key_values


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward (a PEFT model's base model's) takes `logits_to_keep` (transformers ≥ 4.50)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def check_ids_fit(model: torch.nn.Module, ids: Sequence[int], source: str, *, room: int = 0) -> None:
    """An InputError naming `source` unless the ids fit the vocabulary and, with `room` more, the positions."""
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        vocab = None
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if vocab is not None and ids and max(ids) >= vocab:
        raise InputError(f"{source}: token id {max(ids)} is outside the model's vocabulary of {vocab}")
    if isinstance(positions, int) and len(ids) + room > positions:
        extra = f" plus {room} to generate" if room else ""
        raise InputError(f"{source}: {len(ids)} tokens{extra}, more than the model's {positions} positions; shorten it")


# Generation


@dataclass(frozen=True)
class Generation:
    """A greedy continuation: its tokens (without the stop token and padding), its text, and whether it `stopped`
    at a stop token (end of turn, EOS) before `max_new_tokens`."""

    prompt: str | tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str | None
    stopped: bool


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    chat: ChatTemplate | None = None,
) -> list[Generation]:
    """Greedy continuations of `prompts` (`model.generate`, no sampling), each as if generated alone.

    Prompts share a batch left-padded, longest first, except on prefix-tuned PEFT models (left padding changes
    their continuations): one length per batch, one full forward per token (PEFT 0.21.2's `generate` drops the
    prefix from the cache). A continuation stops at any of `stop_ids`.

    Args:
        model: a `transformers` causal LM or a `PeftModel`.
        tokenizer: tokenises text prompts and decodes continuations; None for token ids (`text` is then None).
        prompts: texts, or lists of token ids.
        max_new_tokens: the most tokens generated per prompt.
        batch_size: the most prompts per `generate` call.
        device: where the inputs go; default: the model's device.
        chat: render text prompts through the chat template (`rendering.encode_prompt`).

    Returns:
        One `Generation` per prompt, in order.
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate_greedy: max_new_tokens must be ≥ 1, got {max_new_tokens}")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"generate_greedy: prompt {i} is text, but there is no tokenizer; give token ids")
            encoded.append(encode_prompt(tokenizer, prompt, chat))
        else:
            encoded.append(tuple(int(t) for t in prompt))
        if not encoded[-1]:
            raise ValueError(f"generate_greedy: prompt {i} has no tokens")
    stops = stop_ids(model, tokenizer)
    pad = next(iter(_config_ids(model, tokenizer, "pad_token_id")), min(stops, default=0))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prefix = _is_prefix_tuned(model)
    from transformers import GenerationConfig

    greedy = dict(do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=sorted(stops) or None)
    config = GenerationConfig(max_new_tokens=max_new_tokens, **greedy)
    groups: dict[int, list[int]] = {}  # prompt indices, longest first (of one length per group if prefix-tuned)
    for i in sorted(range(len(encoded)), key=lambda i: -len(encoded[i])):
        groups.setdefault(len(encoded[i]) if prefix else 0, []).append(i)
    batches = [group[k : k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]
    results: list[Generation | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                width = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in enumerate(batch):  # left padding: every prompt ends at the last column
                    input_ids[j, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[j, width - len(encoded[i]) :] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                if prefix:
                    out = _greedy_without_cache(model, input_ids, max_new_tokens, stops, pad)
                else:
                    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
                for i, row in zip(batch, out[:, width:].tolist(), strict=True):
                    end = next((k for k, t in enumerate(row) if t in stops), None)
                    tokens = tuple(row if end is None else row[:end])
                    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
                    results[i] = Generation(prompts[i], tokens, text, end is not None)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]  # every slot filled


def _greedy_without_cache(
    model: Any, input_ids: torch.Tensor, max_new_tokens: int, stops: frozenset[int], pad: int
) -> torch.Tensor:
    """Argmax of a full forward pass per step (unpadded prompts) until every row has stopped."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    stop = torch.tensor(sorted(stops), dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = _logits(model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)))
        token = logits[:, -1].argmax(dim=-1).masked_fill(done, pad)
        input_ids = torch.cat([input_ids, token[:, None]], dim=1)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
    return input_ids


def stop_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a continuation: every EOS of the tokenizer, generation config (end of turn) and config."""
    return frozenset(i for i in _config_ids(model, tokenizer, "eos_token_id") if not isinstance(i, bool))


def _is_prefix_tuned(model: torch.nn.Module) -> bool:
    peft_type = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    return getattr(peft_type, "value", peft_type) == "PREFIX_TUNING"


def _config_ids(model: torch.nn.Module, tokenizer: Any, name: str) -> list[int]:
    """Every integer `name` of the tokenizer, then the generation config, then the config (lists flattened)."""
    ids = []
    for source in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, name, None)
        ids += [i for i in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(i, int)]
    return ids


# Repetition and diversity


def _ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rep_n(tokens: Sequence[Hashable], n: int = 4) -> float:
    """n-gram repetition of one continuation: 1 − |distinct n-grams| / |n-grams|, in [0, 1); 0.0 under n tokens.

    seq-rep-n of Welleck et al. 2020, the rep-4 of the Ext-Sub paper (§5.1; its tables print 100× the value)."""
    grams = _ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_rep_n(continuations: Iterable[Sequence[Hashable]], n: int = 4) -> float:
    """Mean `rep_n` over the continuations of ≥ n tokens (shorter ones carry no evidence); NaN if none."""
    values = [rep_n(c, n) for c in continuations if len(c) >= n]
    return sum(values) / len(values) if values else math.nan


def distinct_n(texts: Iterable[str | Sequence[Hashable]], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): |distinct n-grams| / |n-grams| over all texts (strings split on
    whitespace, n-grams within a text); NaN when no text has n tokens."""
    grams = [g for t in texts for g in _ngrams(t.split() if isinstance(t, str) else t, n)]
    return len(set(grams)) / len(grams) if grams else math.nan
