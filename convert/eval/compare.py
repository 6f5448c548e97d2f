"""`gqa-convert eval`: quality against KV-cache memory and decode speed, for several models side by side."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from transformers import AutoConfig

from convert.eval.causal import evaluate_causal
from convert.eval.common import ModelEval, check_lengths, find_tokenizer, refuse_shipped_code
from convert.eval.seq2seq import evaluate_seq2seq, is_encoder_decoder


def evaluate_model(path: str, **options) -> ModelEval:
    """One model's row: `evaluate_causal`, or `evaluate_seq2seq` for an encoder-decoder (T5: span-corruption loss,
    decode from a fixed encoder output)."""
    return (evaluate_seq2seq if is_encoder_decoder(path) else evaluate_causal)(path, **options)


def compare(models: list[str], **options) -> list[ModelEval]:
    """Evaluate each model with the same text and settings, one after the other (one in memory at a time).

    Every model's lengths and tokenizer are checked first, so a bad one fails before the others are measured.
    Encoder-decoders (span-corruption loss) and decoder-only models (perplexity) are not mixed in one table.
    """
    kinds = {m: "encoder-decoder" if is_encoder_decoder(m) else "decoder-only" for m in models}
    if len(set(kinds.values())) > 1:  # perplexity and span-corruption loss are not one scale
        listed = ", ".join(f"{m} ({k})" for m, k in kinds.items())
        raise ValueError(f"compare encoder-decoder models with each other and decoder-only with each other: {listed}")
    trust = options.get("trust_remote_code", False)
    for m in models:
        refuse_shipped_code(m, trust)
        if kinds[m] == "decoder-only":  # T5's relative positions have no length limit to check
            check_lengths(
                m,
                AutoConfig.from_pretrained(m, trust_remote_code=trust),
                options.get("window", 512),
                options.get("contexts"),
                options.get("new_tokens", 32),
            )
        find_tokenizer(m, options.get("tokenizer"))
    return [evaluate_model(m, **options) for m in models]


def as_dicts(results: list[ModelEval]) -> list[dict]:
    """JSON-ready rows, each with ratios to the first model."""
    base = results[0]
    rows = []
    for r in results:
        row = asdict(r)
        row["ratio_to_first"] = {
            "perplexity": r.perplexity / base.perplexity,
            "kv_cache_bytes_per_token": r.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token,
        }
        first = {b.context: b for b in base.decode}
        for d in row["decode"]:  # paired by context length: either model may have left a context out
            b = first.get(d["context"])
            d["speedup_vs_first"] = d["tokens_per_s"] / b.tokens_per_s if b else None
        rows.append(row)
    return rows


def format_table(results: list[ModelEval]) -> str:
    """One Markdown table: quality, KV cache, decode speed per context, with ratios to the first model."""
    base = results[0]
    contexts = sorted({d.context for r in results for d in r.decode})
    first = {d.context: d for d in base.decode}
    head = ["model", "KV heads", "ppl", "ppl ×", "KV B/token", "KV ×"]
    head += [f"tok/s @{c}" for c in contexts] + [f"peak MB @{contexts[-1]}"] if contexts else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            Path(r.model).name or r.model,
            str(r.num_kv_heads),
            f"{r.perplexity:.2f}",
            f"{r.perplexity / base.perplexity:.2f}",
            f"{r.kv_cache_bytes_per_token:,}",
            f"{r.kv_cache_bytes_per_token / base.kv_cache_bytes_per_token:.2f}",
        ]
        speeds = {d.context: d for d in r.decode}
        for c in contexts:
            d, b = speeds.get(c), first.get(c)
            ratio = f" ({d.tokens_per_s / b.tokens_per_s:.2f}×)" if d and b else ""
            cells.append(f"{d.tokens_per_s:.1f}{ratio}" if d else "-")
        if contexts:
            last = speeds.get(contexts[-1])
            cells.append(f"{last.peak_memory_bytes / 1e6:.0f}" if last else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
