"""Does a runtime nobody here wrote answer the sample task with sftrun's GGUF exports?

For a trained checkpoint (default: the newest intact one of ``make train``'s run), this
1. scores the adapter model itself with transformers (greedy, the run's chat template);
2. exports GGUF files (``f16``, ``q8_0``, ``q4_0``) with ``sftrun export``;
3. loads each in llama.cpp through ``llama-cpp-python`` (``make export-check`` installs it
   from the package registry, which builds llama.cpp from source: ~10 min on 2 cores),
   formats every held-out conversation with the chat template *stored in the GGUF's metadata*
   (llama-cpp-python's own Jinja formatter), and generates greedily (temperature 0);
4. prints exact-JSON accuracy per quantization next to the transformers model's, and writes
   them as JSON.

Both sides score the same held-out prompts with the same scorer (``evaluate.score_json``)
and the same token budget (the run's ``eval_max_new_tokens``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUANTS = ("f16", "q8_0", "q4_0")


def _transformers_accuracy(ckpt: Path, convs: list[Any], tokens: int) -> dict[str, Any]:
    import torch

    from sftrun.evaluate import generation_accuracy
    from sftrun.export import load_adapter_model

    loaded = load_adapter_model(ckpt)
    t0 = time.perf_counter()
    result = generation_accuracy(
        loaded.model, loaded.tokenizer, convs, "json", tokens, 8, torch.device("cpu")
    )
    return {
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _llama_accuracy(gguf: Path, convs: list[Any], tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama

    from sftrun.evaluate import score_json

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, verbose=False, seed=0)
    template = llm.metadata.get("tokenizer.chat_template", "")
    correct, samples, t0 = 0, [], time.perf_counter()
    for conv in convs:
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        reply = llm.create_chat_completion(
            messages=conv.messages[:last], temperature=0.0, max_tokens=tokens
        )
        pred = (reply["choices"][0]["message"]["content"] or "").strip()
        ok = score_json(pred, conv.messages[last]["content"])
        correct += ok
        if len(samples) < 3 or not ok:
            samples.append({"reference": conv.messages[last]["content"], "prediction": pred})
    return {
        "accuracy": correct / len(convs),
        "correct": correct,
        "total": len(convs),
        "seconds": round(time.perf_counter() - t0, 1),
        "template_from_gguf": bool(template),
        "size_mb": round(gguf.stat().st_size / 1e6, 1),
        "examples": samples[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: newest intact)")
    parser.add_argument("--config", default=str(REPO / "configs/training_config.yaml"))
    parser.add_argument("--work", default=str(REPO / "outputs/5_export/check"))
    parser.add_argument("--quants", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from sftrun import runfolder
    from sftrun.config import load_config
    from sftrun.data import read_conversations
    from sftrun.export import export

    cfg = load_config(args.config)
    ckpt = (
        Path(args.checkpoint) if args.checkpoint else runfolder.resolve("latest", cfg.output_dir)[0]
    )
    if ckpt is None:
        raise SystemExit(f"no checkpoint in {cfg.output_dir}: run `make train` first")
    convs = [c for c in read_conversations(cfg.eval_file) if c.messages]
    tokens = cfg.eval_max_new_tokens
    print(f"checkpoint {ckpt}; {len(convs)} held-out prompts; greedy, {tokens} new tokens")
    rows: dict[str, Any] = {
        "transformers (adapter model, fp32)": _transformers_accuracy(ckpt, convs, tokens)
    }
    for quant in args.quants:
        out = Path(args.work) / quant
        report = export(ckpt, out, "gguf", quant=quant)
        rows[f"llama.cpp {quant}"] = _llama_accuracy(out / report["gguf"], convs, tokens)
        rows[f"llama.cpp {quant}"]["top1_agreement_vs_adapter"] = report["top1_agreement"]
    record = {
        "checkpoint": str(ckpt),
        "machine": platform.processor() or platform.machine(),
        "versions": {
            n: metadata.version(n) for n in ("llama_cpp_python", "gguf", "transformers", "torch")
        },
        "results": rows,
    }
    print("| model | exact-JSON accuracy | time (s) |")
    print("|---|---|---|")
    for name, r in rows.items():
        share = f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['total']})"
        print(f"| {name} | {share} | {r['seconds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
