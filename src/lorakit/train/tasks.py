"""Tasks: how examples become tensors, what the loss is, and how a model is scored.

- `ClassifyLM` (`classify-lm`): a causal LM reads `prompt_template` (ending in e.g.
  "Sentiment:") and the answer is one label word. Training: cross-entropy on the
  answer tokens only. Scoring: each label word's log-likelihood given the prompt;
  the prediction is the most likely one (one forward per batch when every answer
  is a single token).
- `ClassifyHead` (`classify-head`): an encoder with a sequence-classification head;
  cross-entropy on the head's logits; prediction = argmax.
- `Instruct` (`instruct`): prompt -> response in the tokenizer's chat template
  (plain "Question:/Answer:" without one); loss on response tokens only; scored by
  held-out mean token loss (nats) and perplexity `exp(loss)`.

Every task returns batches as dicts of tensors on the requested device, and
`evaluate` returns `(metrics, predictions)`, predictions in the examples' order.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.loss import causal_lm_loss, shift_labels
from .errors import DataError
from .packing import collate_packed
from .recipe import GENERIC_TEMPLATE, SENTIMENT_TEMPLATE

IGNORE = -100


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype` on `device`, or a no-op context for full precision."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class TaskLoss(nn.Module):
    """`forward(batch) -> (loss, tokens)`: a task's training loss as a module's forward.

    What the training loop calls and what DDP / FSDP2 wrap: the chunked loss of the causal-LM
    tasks runs the model's backbone and head directly (`lorakit.ops.loss.causal_lm_loss`), so it
    must sit inside a forward the wrappers see. Its parameters are the model's. With FSDP2 it is
    the root module, so an evaluation must run inside its forward too (`evaluate=fn`: returns
    `fn(model)` with the root's parameters gathered).
    """

    def __init__(self, task: "Task", model: nn.Module):
        super().__init__()
        self.task = task
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor] | None = None, evaluate=None):
        if evaluate is not None:
            return evaluate(self.model)
        return self.task.loss(self.model, batch)


class Task:
    """Common interface; see the module docstring."""

    name = ""
    model_kind = "causal-lm"  # or "seq-cls"

    def __init__(self, recipe, tokenizer, examples: list[dict[str, Any]]):
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.max_length = recipe.max_length

    def describe(self) -> dict[str, Any]:
        return {"task": self.name}

    def batch(self, examples: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """`(mean loss over supervised tokens or examples, number of input tokens)`."""
        raise NotImplementedError

    def lengths(self, examples) -> list[int]:
        """Tokens of each example as `batch` encodes it (for the padding report)."""
        return []

    def full_lengths(self, examples) -> list[int]:
        """Tokens of each example before truncation to `max_length` (for the truncation report)."""
        return self.lengths(examples)

    truncation_rule = "none: examples are not truncated"

    def evaluate(self, model, examples, batch_size: int, device: torch.device,
                 dtype=None) -> tuple[dict[str, float], list]:
        raise NotImplementedError

    def probe(self, model, examples, device: torch.device, dtype=None) -> torch.Tensor:
        """Logits on a few examples, float32 on the CPU: compared across merged / unmerged / reloaded models."""
        raise NotImplementedError


# ---------------------------------------------------------------------- causal LM helpers
def _supports_logits_to_keep(model) -> bool:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # passes keyword arguments through
        model = model.module
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def label_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict supervised tokens.

    Args:
        batch: `input_ids`, `attention_mask`, `labels`, each `(B, L)` long; `labels` is
            `IGNORE` (-100) where no loss is taken.
    Returns:
        `(logits (N, V) float32, targets (N,) long, rows (N,) long)`: N supervised tokens,
        V the vocabulary, `rows` the batch row of each token.

    Only the tail of the sequence from the first supervised position on goes through
    the LM head (`logits_to_keep`), which saves most of the head's cost.
    """
    labels = batch["labels"]
    L = labels.shape[1]
    supervised = labels != IGNORE
    first = int(supervised.float().argmax(dim=1).min())
    start = max(first - 1, 0)
    keep = L - start
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _supports_logits_to_keep(model):
        logits = model(**kwargs, logits_to_keep=keep).logits
    else:
        logits = model(**kwargs).logits[:, start:]
    # logits[:, j] sits at position start + j and predicts token start + j + 1
    pred = logits[:, :-1]
    target = labels[:, start + 1:]
    mask = target != IGNORE
    rows = mask.nonzero()[:, 0]
    return pred[mask].float(), target[mask], rows


class _CausalTask(Task):
    def _encode(self, prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
        """Fit prompt + answer into `max_length`: the answer loses its end first (keeping one
        token), then the prompt its start."""
        answer_ids = answer_ids[: max(1, self.max_length - 1)]
        budget = self.max_length - len(answer_ids)
        if len(prompt_ids) > budget:
            prompt_ids = prompt_ids[len(prompt_ids) - budget:]
        return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids

    def _collate(self, pairs: list[tuple[list[int], list[int]]], device) -> dict[str, torch.Tensor]:
        ids = [p[0] for p in pairs]
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": _pad(ids, pad).to(device),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0).to(device),
            "labels": _pad([p[1] for p in pairs], IGNORE).to(device),
            "tokens": torch.tensor(sum(len(r) for r in ids)),
        }

    def loss(self, model, batch):
        """The chunked cross-entropy over the supervised tokens (`lorakit.ops.loss.causal_lm_loss`: no
        `(tokens, vocab)` logits), weighted by `loss_weights` when a packed batch has them."""
        inputs = {k: v for k, v in batch.items() if k != "tokens"}
        return causal_lm_loss(model, **inputs), int(batch["tokens"])

    @torch.no_grad()
    def probe(self, model, examples, device, dtype=None):  # logits at the supervised positions
        model.eval()
        with autocast(device, dtype):
            logits, _, _ = label_logits(model, self.batch(examples, device))
        return logits.float().cpu()


# ---------------------------------------------------------------------- classify-lm
class ClassifyLM(_CausalTask):
    """Label words as one-word answers of a causal LM (see module docstring)."""

    name = "classify-lm"

    def __init__(self, recipe, tokenizer, examples):
        super().__init__(recipe, tokenizer, examples)
        self.labels = sorted({e["label"] for e in examples}, key=str)
        words = recipe.label_words or {}
        unknown = sorted(set(words) - {str(l) for l in self.labels})
        if unknown:
            raise DataError(f"label_words names labels {unknown} that are not in the data (labels: "
                            f"{[str(l) for l in self.labels]})")
        self.words = [words.get(str(l), str(l)).strip() for l in self.labels]
        if len(set(self.words)) != len(self.words):
            raise DataError(f"label words must differ, got {self.words}")
        self.answer_ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in self.words]
        if len({tuple(a) for a in self.answer_ids}) != len(self.answer_ids):
            raise DataError(f"label words {self.words} tokenize identically")
        self.single_token = all(len(a) == 1 for a in self.answer_ids)
        default = SENTIMENT_TEMPLATE if recipe.data == "rotten-tomatoes" else GENERIC_TEMPLATE
        self.template = recipe.prompt_template or default
        self.index = {l: i for i, l in enumerate(self.labels)}

    def describe(self):
        return {"task": self.name, "labels": [str(l) for l in self.labels], "answers": [" " + w for w in self.words],
                "answer_token_ids": self.answer_ids, "prompt_template": self.template,
                "scoring": "argmax over the answers' summed log-likelihoods given the prompt"}

    def prompt(self, text: str) -> str:
        return self.template.format(text=text, choices=", ".join(self.words))

    truncation_rule = ("the document keeps its start: its end is cut so that the template's question and answer cue "
                       "stay (a template longer than max_length alone loses its start)")

    def full_prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(self.prompt(text))["input_ids"]

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's tokens within `max_length` minus the longest answer: a long document loses its end."""
        ids = self.full_prompt_ids(text)
        budget = self.max_length - min(max(len(a) for a in self.answer_ids), self.max_length - 1)
        if len(ids) <= budget:
            return ids
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - (len(ids) - budget)
        while keep > 0:  # re-tokenizing the cut text can merge tokens differently: shrink until it fits
            ids = self.full_prompt_ids(self.tokenizer.decode(text_ids[:keep]))
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget
        return self.full_prompt_ids("")  # the template alone is too long: `_encode` cuts its start

    def full_lengths(self, examples) -> list[int]:
        return [len(self.full_prompt_ids(e["text"])) + len(self.answer_ids[self.index[e["label"]]]) for e in examples]

    def encode(self, example) -> tuple[list[int], list[int]]:
        return self._encode(self.prompt_ids(example["text"]), self.answer_ids[self.index[example["label"]]])

    def batch(self, examples, device):
        return self._collate([self.encode(e) for e in examples], device)

    def lengths(self, examples) -> list[int]:
        return [len(self.encode(e)[0]) for e in examples]

    @torch.no_grad()
    def _scores(self, model, prompts: list[list[int]], device) -> torch.Tensor:
        """`(B, C)` summed log-likelihood of each of the C (multi-token) answers after each prompt."""
        out = torch.zeros(len(prompts), len(self.answer_ids))
        for c, answer in enumerate(self.answer_ids):
            batch = self._collate([self._encode(p, answer) for p in prompts], device)
            logits, targets, rows = label_logits(model, batch)
            token_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            out[:, c] = torch.zeros(len(prompts), device=token_logp.device).index_add_(0, rows, token_logp).cpu()
        return out

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size, device, dtype=None):
        """Accuracy and mean answer loss over `examples`.

        Returns `({"accuracy", "loss", "n", "predicted_<word>": share}, predictions)` where
        loss is the mean negative log-likelihood (nats) of the gold answer's first token
        under the full vocabulary, and predictions are label values.
        """
        was_training = model.training
        model.eval()
        prompts = [self.prompt_ids(e["text"]) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: (len(prompts[i]), i))
        scores = torch.zeros(len(examples), len(self.labels))
        gold_loss = torch.zeros(len(examples))
        with autocast(device, dtype):
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                encoded = [self._encode(prompts[i], self.answer_ids[self.index[examples[i]["label"]]]) for i in idx]
                batch = self._collate(encoded, device)
                logits, targets, rows = label_logits(model, batch)
                logp = torch.log_softmax(logits, dim=-1)
                if self.single_token:
                    scores[idx] = logp[:, [a[0] for a in self.answer_ids]].cpu()
                    gold_loss[idx] = -logp.gather(1, targets[:, None])[:, 0].cpu()
                else:
                    scores[idx] = self._scores(model, [prompts[i] for i in idx], device)
                    token_nll = -logp.gather(1, targets[:, None])[:, 0]
                    first = torch.ones_like(rows, dtype=torch.bool)
                    first[1:] = rows[1:] != rows[:-1]
                    gold_loss[idx] = token_nll[first].cpu()
        model.train(was_training)
        pred_idx = scores.argmax(dim=1).tolist()
        gold_idx = [self.index[e["label"]] for e in examples]
        correct = sum(p == g for p, g in zip(pred_idx, gold_idx))
        metrics = {"accuracy": correct / len(examples), "loss": float(gold_loss.mean()), "n": len(examples)}
        for i, w in enumerate(self.words):
            metrics[f"predicted_{w}"] = sum(p == i for p in pred_idx) / len(examples)
        return metrics, [self.labels[i] for i in pred_idx]



# ---------------------------------------------------------------------- instruct
class Instruct(_CausalTask):
    """Prompt -> response; loss on response tokens only (see module docstring)."""

    name = "instruct"

    def __init__(self, recipe, tokenizer, examples):
        super().__init__(recipe, tokenizer, examples)
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def describe(self):
        fmt = "chat template" if self.chat else "Question: {prompt}\\nAnswer: {response}<eos>"
        return {"task": self.name, "format": fmt,
                "loss": "mean cross-entropy (nats) over response tokens; perplexity = exp(loss)"}

    def prefix_text(self, prompt: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Question: {prompt}\nAnswer:"

    truncation_rule = "a long prompt keeps its end (the question next to the answer); a long answer loses its end"

    def encode(self, example) -> tuple[list[int], list[int]]:
        return self._encode(*self._parts(example))

    def full_lengths(self, examples) -> list[int]:
        return [sum(map(len, self._parts(e))) for e in examples]

    def _parts(self, example) -> tuple[list[int], list[int]]:
        """`(prompt ids, answer ids)` before truncation."""
        tok = self.tokenizer
        prefix = self.prefix_text(example["prompt"])
        if self.chat:
            full = tok.apply_chat_template(
                [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}],
                tokenize=False,
            )
            if not full.startswith(prefix):  # a template that rewrites earlier turns: fall back to prefix + response
                full = prefix + example["response"] + (tok.eos_token or "")
            answer = full[len(prefix):]
        else:
            answer = " " + example["response"] + (tok.eos_token or "")
        prefix_ids = tok(prefix, add_special_tokens=not self.chat)["input_ids"]
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        return prefix_ids, answer_ids

    def batch(self, examples, device):
        """A padded batch of examples, or (items that are lists: packed rows of examples) a packed one
        (`lorakit.train.packing.collate_packed`: positions restart per example, each attends only to
        itself). Both are the mean over the supervised tokens, so `--packing` changes the speed, not
        what is optimised: a packed batch's loss equals the padded batch's of the same examples."""
        if examples and isinstance(examples[0], list):
            rows = [[self.encode(e) for e in row] for row in examples]
            cpu = device is None or torch.device(device).type == "cpu"
            packed = collate_packed(rows, self.tokenizer.pad_token_id, weighting="token",
                                    attention="mask" if cpu else "position_ids",
                                    mask_dtype=torch.float32 if cpu else None)  # a float mask: no per-layer copy
            packed["tokens"] = torch.tensor(sum(len(x) for row in rows for x, _ in row))
            return {k: v.to(device) if k != "tokens" else v for k, v in packed.items()}
        return self._collate([self.encode(e) for e in examples], device)

    def lengths(self, examples) -> list[int]:
        return [len(self.encode(e)[0]) for e in examples]

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size, device, dtype=None):
        """`({"loss": mean nats per response token, "perplexity": exp(loss), "tokens", "n"}, per-example losses)`.

        The chunked loss per token (`reduction="none"`): no `(tokens, vocab)` logits, whatever the length."""
        was_training = model.training
        model.eval()
        encoded = [self.encode(e) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: (len(encoded[i][0]), i))
        sums = torch.zeros(len(examples), dtype=torch.float64)
        counts = torch.zeros(len(examples), dtype=torch.float64)
        with autocast(device, dtype):
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                batch = self._collate([encoded[i] for i in idx], device)
                nll = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                     reduction="none").double().cpu()
                n = (shift_labels(batch["labels"]) != IGNORE).sum(1).cpu()
                sums[idx] = nll.sum(1)
                counts[idx] = n.double()
        model.train(was_training)
        loss = float(sums.sum() / counts.sum())
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(counts.sum()),
                "n": len(examples)}, (sums / counts).tolist()


    @torch.no_grad()
    def generate(self, model, prompt: str, device, max_new_tokens: int = 32) -> str:
        """Greedy answer to `prompt` (for the report's examples)."""
        model.eval()
        tok = self.tokenizer
        ids = tok(self.prefix_text(prompt), add_special_tokens=not self.chat,
                  return_tensors="pt")["input_ids"].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- classify-head
class ClassifyHead(Task):
    """Sequence classification with a trained head (see module docstring)."""

    name = "classify-head"
    model_kind = "seq-cls"

    def __init__(self, recipe, tokenizer, examples):
        super().__init__(recipe, tokenizer, examples)
        self.labels = sorted({e["label"] for e in examples}, key=str)
        self.index = {l: i for i, l in enumerate(self.labels)}

    truncation_rule = "the text keeps its start (the tokenizer's truncation to max_length)"

    def describe(self):
        return {"task": self.name, "labels": [str(l) for l in self.labels],
                "scoring": "argmax of the classification head"}

    def full_lengths(self, examples) -> list[int]:
        return [len(ids) for ids in self.tokenizer([e["text"] for e in examples])["input_ids"]]

    def batch(self, examples, device):
        enc = self.tokenizer([e["text"] for e in examples], truncation=True, max_length=self.max_length,
                             padding=True, return_tensors="pt")
        out = {k: v.to(device) for k, v in enc.items()}
        out["labels"] = torch.tensor([self.index[e["label"]] for e in examples], device=device)
        return out

    def _forward(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()

    def loss(self, model, batch):
        return F.cross_entropy(self._forward(model, batch), batch["labels"]), int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model, examples, batch_size, device, dtype=None):
        """`({"accuracy", "loss" (mean cross-entropy, nats), "n"}, predicted labels)`."""
        was_training = model.training
        model.eval()
        lengths = [len(self.tokenizer(e["text"], truncation=True,
                                      max_length=self.max_length)["input_ids"]) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
        logits_all = torch.zeros(len(examples), len(self.labels))
        with autocast(device, dtype):
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                logits_all[idx] = self._forward(model, self.batch([examples[i] for i in idx], device)).cpu()
        model.train(was_training)
        gold = torch.tensor([self.index[e["label"]] for e in examples])
        pred = logits_all.argmax(dim=1)
        metrics = {"accuracy": float((pred == gold).float().mean()), "loss": float(F.cross_entropy(logits_all, gold)),
                   "n": len(examples)}
        return metrics, [self.labels[i] for i in pred.tolist()]

    @torch.no_grad()
    def probe(self, model, examples, device, dtype=None):
        model.eval()
        with autocast(device, dtype):
            return self._forward(model, self.batch(examples, device)).cpu()


TASK_CLASSES = {cls.name: cls for cls in (ClassifyLM, ClassifyHead, Instruct)}  # `text`: lorakit.train.text
