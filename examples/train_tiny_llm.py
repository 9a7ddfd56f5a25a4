"""Train a small Llama-architecture decoder offline, on the Python standard library's sources.

No model hub is reachable here, so the decoder that ``benchmarks/llm_pruning.py`` prunes is made
here, from text that ships with the interpreter: the module sources ``Lib/**/*.py`` of the
running Python (``sysconfig.get_paths()["stdlib"]``, packages included; test suites and
``site-packages`` left out: 661 files, 11.8 MB on CPython 3.11). Files are split by a hash of
their path into three disjoint sets: held-out (1 in 10 files), calibration (1 in 10) and
training (the rest). A byte-level BPE tokenizer (``tokenizers``) is trained on the training
files only.

The model is a ``transformers`` ``LlamaForCausalLM`` with grouped-query attention: 8 layers of
10 query heads of size 32 and 5 key/value heads, MLP width 864, vocabulary 4096 (11.7 M
parameters, 9.1 M of them in attention and MLP). It is trained from scratch with AdamW on random
windows of the training token stream, on one CPU thread, for a fixed wall-clock budget
(``--minutes``; the learning rate warms up, then follows a cosine of the elapsed fraction of the
budget), so how far it gets depends on the machine's load. The result is a plain Hugging Face
model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``train.json``)
cached under ``$COSTREAM_CACHE`` or ``~/.cache/costream``; a rerun loads it. The report
compares the held-out perplexity (first 256 windows of the held-out stream) with a unigram
baseline (token frequencies of the training split, add-one smoothed).

Usage::

    nice -n 10 python examples/train_tiny_llm.py            # 70 min on one thread
    python examples/train_tiny_llm.py --quick               # tiny model, seconds
    python examples/train_tiny_llm.py --retrain --minutes 20
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

VERSION = 2  # bump when the corpus, the tokenizer or the training changes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the cached model depends on."""

    vocab: int = 4096
    hidden: int = 320
    layers: int = 8
    heads: int = 10
    kv_heads: int = 5
    intermediate: int = 864
    context: int = 128
    batch: int = 8
    lr: float = 2e-3
    minutes: float = 70.0
    seed: int = 0
    steps: int = 0  # > 0: stop after this many steps (or the time budget, whichever is first)

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if not self.steps:
            del fields["steps"]  # time-budget-only runs keep the keys they had before
        text = json.dumps({**fields, "data": VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


EVAL_WINDOWS = 256  # held-out windows (of ``context`` tokens) the reported perplexity uses
QUICK = TrainConfig(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                    context=64, batch=8, lr=3e-3, minutes=2.0, steps=80)


def cache_dir(override: Path | None = None) -> Path:
    """Where trained models are kept: ``override``, ``$COSTREAM_CACHE`` or ``~/.cache/costream``."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("COSTREAM_CACHE", Path.home() / ".cache" / "costream"))


SKIP_DIRS = {"site-packages", "idle_test", "lib2to3", "__pycache__"}


def split_of(name: str) -> str:
    """``"heldout"``, ``"calibration"`` or ``"train"`` for a file's path under the standard
    library (a fixed hash)."""
    bucket = zlib.crc32(name.encode()) % 10
    return "heldout" if bucket == 0 else "calibration" if bucket == 1 else "train"


def corpus(max_files: int | None = None) -> dict[str, list[str]]:
    """The stdlib's module sources (packages included, test suites and site-packages left out),
    by split (files sorted by path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not any(
        d in SKIP_DIRS or d.startswith("test") for d in f.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: cannot build the corpus")
    out: dict[str, list[str]] = {"train": [], "calibration": [], "heldout": []}
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        out[split_of(f.relative_to(root).as_posix())].append(text)
    if max_files is not None:
        out = {k: v[:max_files] for k, v in out.items()}
    return out


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE tokenizer with ``vocab`` entries, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tokenizer: Any, texts: list[str]) -> Tensor:
    """One token stream: every text encoded, each followed by ``<|endoftext|>``."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(cfg: TrainConfig) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of ``cfg``'s shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate,
                         max_position_embeddings=cfg.context * 4, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def windows(stream: Tensor, context: int) -> Tensor:
    """The stream cut into consecutive non-overlapping windows ``(N, context)``."""
    n = len(stream) // context
    return stream[: n * context].view(n, context)


@torch.no_grad()
def perplexity(model: Any, stream: Tensor, context: int, batch: int = 16,
               max_windows: int | None = None) -> float:
    """Perplexity of ``model`` on consecutive windows of ``stream`` (every token after the
    first of each window is predicted)."""
    model.eval()
    w = windows(stream, context)
    if max_windows is not None:
        w = w[:max_windows]
    if len(w) == 0:
        raise ValueError(f"the stream has {len(stream)} tokens: fewer than one window of "
                         f"{context}")
    nll, count = 0.0, 0
    for i in range(0, len(w), batch):
        ids = w[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(train: Tensor, heldout: Tensor, vocab: int) -> float:
    """Perplexity of add-one-smoothed training-token frequencies on ``heldout``."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[heldout].mean()))


def train(model: Any, data: Tensor, cfg: TrainConfig, log: bool) -> dict[str, Any]:
    """AdamW on random windows of ``data`` for ``cfg.minutes`` of wall clock (or ``cfg.steps``
    steps, if set, when they come first)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget, warmup = cfg.minutes * 60.0, 30
    model.train()
    t0, step, recent = time.perf_counter(), 0, []
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget or (cfg.steps and step >= cfg.steps):
            break
        frac = max(elapsed / budget, step / cfg.steps if cfg.steps else 0.0)
        lr = cfg.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        start = torch.randint(0, len(data) - cfg.context - 1, (cfg.batch,), generator=gen)
        ids = torch.stack([data[s:s + cfg.context] for s in start.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent = [*recent[-49:], float(loss.detach())]
        if log and step % 50 == 0:
            print(f"  step {step}: loss {sum(recent) / len(recent):.3f} (last 50), lr {lr:.2e},"
                  f" {elapsed:.0f} s", flush=True)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "steps": step,
            "tokens_seen": step * cfg.batch * cfg.context,
            "final_loss": sum(recent) / max(len(recent), 1), "threads": torch.get_num_threads()}


def load_or_train(cfg: TrainConfig, cache: Path | None = None, retrain: bool = False,
                  log: bool = True, max_files: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The directory of the trained model (trained now unless cached) and its ``train.json``."""
    path = cache_dir(cache) / f"tiny_llm-{cfg.key()}"
    if (path / "train.json").is_file() and not retrain:
        if log:
            print(f"loaded the trained model from {path}")
        return path, json.loads((path / "train.json").read_text())
    texts = corpus(max_files)
    if log:
        print(f"training a tokenizer ({cfg.vocab} tokens) on {len(texts['train'])} files")
    tokenizer = train_tokenizer(texts["train"], cfg.vocab)
    streams = {k: encode(tokenizer, v) for k, v in texts.items()}
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if log:
        print(f"training {n_params / 1e6:.2f} M parameters for {cfg.minutes} min on "
              f"{len(streams['train'])} tokens")
    info = train(model, streams["train"], cfg, log)
    info.update(config=dataclasses.asdict(cfg), params=n_params,
                tokens={k: len(v) for k, v in streams.items()},
                files={k: len(v) for k, v in texts.items()},
                heldout_windows=min(EVAL_WINDOWS, len(windows(streams["heldout"], cfg.context))),
                heldout_perplexity=perplexity(model, streams["heldout"], cfg.context,
                                              max_windows=EVAL_WINDOWS),
                unigram_perplexity=unigram_perplexity(streams["train"], streams["heldout"],
                                                      cfg.vocab))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "train.json").write_text(json.dumps(info, indent=2))
    return path, info


def load_streams(path: Path, max_files: int | None = None) -> dict[str, Tensor]:
    """The three splits of the corpus, tokenized with the tokenizer saved in ``path``."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    return {k: encode(tokenizer, v) for k, v in corpus(max_files).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, a few seconds")
    p.add_argument("--minutes", type=float, default=None, help="training budget (default 70)")
    p.add_argument("--cache", type=Path, default=None, help="cache directory")
    p.add_argument("--retrain", action="store_true", help="ignore a cached model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else TrainConfig()
    if args.minutes is not None:
        cfg = dataclasses.replace(cfg, minutes=args.minutes)
    path, info = load_or_train(cfg, args.cache, args.retrain, max_files=8 if args.quick else None)
    print(f"model: {path}")
    print(f"{info['params'] / 1e6:.2f} M parameters, {info['steps']} steps "
          f"({info['tokens_seen']} tokens) in {info['seconds']:.0f} s")
    print(f"held-out perplexity {info['heldout_perplexity']:.2f}, unigram baseline "
          f"{info['unigram_perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
