"""``costream prune-llm``: structurally prune a saved decoder LLM into a new model directory.

Example::

    costream prune-llm ~/.cache/costream/tiny_llm-<key> --out pruned/ --criterion nirvana \\
        --sparsity 0.3 --gamma 3 --calibration calib.txt --candidates 3 --eval heldout.txt

``MODEL_DIR`` is a saved Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2; pruned by
costream or not) with its tokenizer (``tokenizer.json``, or anything ``AutoTokenizer`` loads).
The calibration text is tokenized and cut into windows of ``--seq-len`` tokens; with
``--candidates K > 1`` the windows are dealt into ``K`` disjoint candidate sets and a reference
set, and the candidate whose pruned model has the lowest next-token KL divergence to the
original on the reference set is kept. ``--heal-epochs`` distils the original back into the
pruned model with LoRA (merged). The output directory holds the pruned model (safetensors), the
tokenizer files and ``pruning.json`` (the plan and the measurements); it reloads with
``costream.prune.hf.load_decoder``. Progress goes to stderr, the summary table to stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prune-llm`` subcommand's arguments to ``parser``."""
    parser.add_argument("model_dir", type=Path, help="saved causal LM directory")
    parser.add_argument("--out", type=Path, required=True, help="directory for the pruned model")
    parser.add_argument("--criterion", choices=("magnitude", "taylor", "nirvana", "fluctuation"),
                        default="nirvana", help="importance criterion (default nirvana)")
    parser.add_argument("--sparsity", type=float, default=0.3,
                        help="fraction of attention+MLP parameters to remove (default 0.3)")
    parser.add_argument("--gamma", type=float, default=3.0,
                        help="neuron / key-value-group removal ratio (default 3)")
    parser.add_argument("--multiple-of", type=int, default=8,
                        help="kept widths are multiples of this (default 8)")
    parser.add_argument("--calibration", type=Path, action="append", default=[],
                        help="calibration text file (repeatable; needed unless magnitude)")
    parser.add_argument("--candidates", type=int, default=1,
                        help="candidate calibration sets for KL selection (default 1: none)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--windows", type=int, default=16,
                        help="calibration windows per candidate set (default 16)")
    parser.add_argument("--eval", type=Path, default=None,
                        help="text file for perplexity before and after (optional)")
    parser.add_argument("--heal-epochs", type=int, default=0,
                        help="LoRA healing passes over the calibration windows (default 0)")
    parser.add_argument("--heal-rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _tokenize(model_dir: Path, texts: list[str]) -> list[int]:
    if (model_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return [i for enc in tok.encode_batch(texts) for i in enc.ids]
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir} holds no tokenizer that loads offline ({e})") from None
    return [i for t in texts for i in tok(t)["input_ids"]]


def _windows(model_dir: Path, files: list[Path], seq_len: int) -> Any:
    import torch

    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"text file {f} does not exist")
    ids = _tokenize(model_dir, [f.read_text(encoding="utf-8", errors="replace") for f in files])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _batches(windows: Any, size: int = 8) -> list[dict[str, Any]]:
    return [{"input_ids": windows[i:i + size]} for i in range(0, len(windows), size)]


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| quantity | original | pruned |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _prune(args: argparse.Namespace, start: float) -> dict[str, Any]:
    from costream.prune.hf import (
        allocate_decoder,
        apply_decoder_plan,
        decoder_parameters,
        heal_decoder,
        load_decoder,
        perplexity,
        score_decoder,
        select_decoder_calibration,
    )

    from ._decoder_models import layer_widths

    _log(f"loading {args.model_dir}", start)
    model = load_decoder(args.model_dir)
    if args.candidates < 1:
        raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
    if args.seq_len < 2 or args.windows < 1:
        raise ValueError("--seq-len must be >= 2 and --windows >= 1")
    sets: list[list[dict[str, Any]]] = []
    reference: list[dict[str, Any]] = []
    if args.calibration:
        windows = _windows(args.model_dir, args.calibration, args.seq_len)
        need = args.windows * args.candidates + (args.windows if args.candidates > 1 else 0)
        if len(windows) < need:
            raise ValueError(f"the calibration text is too short: {len(windows)} windows of "
                             f"{args.seq_len} tokens, {need} needed for {args.candidates} "
                             f"candidate set(s) of {args.windows} (lower --windows or "
                             f"--seq-len)")
        k = args.windows
        sets = [_batches(windows[i * k:(i + 1) * k]) for i in range(args.candidates)]
        reference = _batches(windows[args.candidates * k:(args.candidates + 1) * k])
        _log(f"calibration: {len(windows)} windows of {args.seq_len} tokens", start)
    elif args.criterion != "magnitude":
        raise ValueError(f"--criterion {args.criterion} needs --calibration text")
    info: dict[str, Any] = {"criterion": args.criterion, "sparsity": args.sparsity,
                            "gamma": args.gamma}
    if args.candidates > 1:
        _log(f"scoring {args.candidates} candidate calibration sets ({args.criterion})", start)
        choice = select_decoder_calibration(model, sets, reference, args.sparsity,
                                            args.criterion, args.gamma, args.multiple_of)
        pruned, plan = choice.model, choice.plan
        info.update(candidate=choice.index, candidate_kl=choice.kl)
    else:
        _log(f"scoring ({args.criterion})", start)
        scores = score_decoder(model, args.criterion, sets[0] if sets else None)
        plan = allocate_decoder(model, scores, args.sparsity, args.gamma, args.multiple_of)
        pruned = apply_decoder_plan(model, plan)
    if args.heal_epochs:
        if not sets:
            raise ValueError("--heal-epochs needs --calibration text")
        _log(f"healing: {args.heal_epochs} epoch(s) of rank-{args.heal_rank} LoRA", start)
        heal_decoder(pruned, model, [b for s in sets for b in s], args.heal_rank,
                     args.heal_epochs)
    rows = [("parameters", f"{sum(p.numel() for p in model.parameters()):,}",
             f"{sum(p.numel() for p in pruned.parameters()):,}"),
            ("attention+MLP parameters", f"{decoder_parameters(model):,}",
             f"{decoder_parameters(pruned):,}")]
    widths = layer_widths(model.config), layer_widths(pruned.config)
    rows += [("key/value heads per layer", str(widths[0][0]), str(widths[1][0])),
             ("MLP neurons per layer", str(widths[0][1]), str(widths[1][1]))]
    if args.eval is not None:
        _log(f"perplexity on {args.eval}", start)
        held = _batches(_windows(args.model_dir, [args.eval], args.seq_len))
        if not held:
            raise ValueError(f"--eval text {args.eval} is shorter than one window")
        ppl = perplexity(model, held), perplexity(pruned, held)
        rows.append(("perplexity", f"{ppl[0]:.2f}", f"{ppl[1]:.2f}"))
        info["perplexity"] = {"original": ppl[0], "pruned": ppl[1]}
    _log(f"saving to {args.out}", start)
    pruned.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.model_dir / name).is_file() and not (args.out / name).is_file():
            shutil.copy(args.model_dir / name, args.out / name)
    info.update(plan=plan.to_dict(), removed=plan.sparsity, table=rows)
    (args.out / "pruning.json").write_text(json.dumps(info, indent=2) + "\n")
    return {"rows": rows, "plan": plan}


def run(args: argparse.Namespace) -> int:
    """Run ``costream prune-llm`` with parsed ``args``; return the exit status."""
    start = time.perf_counter()
    try:
        import torch

        torch.manual_seed(args.seed)
        result = _prune(args, start)
    except ImportError as e:
        print(f"costream prune-llm needs the 'hf' extra (pip install 'costream[hf]'): {e}",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"costream prune-llm: error: {e}", file=sys.stderr)
        return 2
    plan = result["plan"]
    print(_table(result["rows"]))
    print(f"\nremoved {100 * plan.sparsity:.1f} % of the attention+MLP parameters "
          f"({100 * plan.head_fraction:.1f} % of key/value groups, "
          f"{100 * plan.neuron_fraction:.1f} % of MLP neurons); saved to {args.out}")
    return 0
