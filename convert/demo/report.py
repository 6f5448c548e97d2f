"""The demo's printed report: the JSON of `run_demo`, as the table and sentences `gqa-convert demo` prints."""

from __future__ import annotations

from typing import Any


def format_demo(r: dict[str, Any]) -> str:
    """The lines `gqa-convert demo` prints for `run_demo`'s result."""
    cal, up = r["calibration"], r["uptraining"]
    lines = [
        f"SmolLM2-135M-Instruct, {r['kv_heads'][0]} -> {r['kv_heads'][1]} KV heads; perplexity on {r['eval_text']}, "
        f"{r['eval_windows']} x {r['window']} tokens; calibrated on {cal['calibration_tokens']} tokens of "
        f"{cal['calibration_data']} ({cal['device']})"
    ]
    if up:
        lines.append(
            f"uptrained: calibrated, then distilled from the original (train {up['train']}, kd_weight "
            f"{up['kd_weight']:g}, lr {up['lr']:g}) on {up['data']}: {up['steps']} steps x {up['block_size']} tokens "
            f"= {up['tokens']:,} tokens in {up['train_seconds']:.0f} s; perplexity {up['perplexity_before']:.2f} -> "
            f"{up['perplexity_after']:.2f}"
        )
    lines.append(f"{'model':<12}{'KV heads':>9}{'KV cache/token':>16}{'perplexity':>12}{'seconds':>9}")
    for name, m in r["models"].items():
        secs = m.get("convert_seconds", m.get("uptrain_seconds"))  # converting, or uptraining (setup and save too)
        secs = f"{secs:.1f}" if secs is not None else "-"
        lines.append(
            f"{name:<12}{m['kv_heads']:>9}{m['kv_cache_bytes_per_token']:>14,} B{m['perplexity']:>12.2f}{secs:>9}"
        )
    lines.append(f"prompt: {r['prompt']}")
    lines.extend(f"  {name + ':':<12} {m['completion']}" for name, m in r["models"].items())
    lines.append(f"load the {'uptrained' if up else 'calibrated'} model:  {r['from_pretrained']}")
    lines.append(f"({r['seconds']:.0f} s in all)")
    return "\n".join(lines)
