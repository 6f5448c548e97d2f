"""Trained-weight evidence for the stock re-expression routes: a small Pythia-layout GPT-NeoX (parallel residual,
partial rotary, untied `embed_out`) pretrained from scratch on WikiText-2 valid with `recipes/uptrain.py`, exactly
as `bench/replicate_paper.py` pretrains its llama; then converted through the `gpt_neox -> phi` route to GQA and
MQA with every method, scored on WikiText-2 test, uptrained briefly with the same recipe, and scored again.

    python bench/mha_families.py --out docs/mha_families [--pretrain-tokens 400000] [--alpha 0.05]

Writes results.json and results.md into --out. The re-expression alone (G = H) is scored too: it must equal the
source's perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from replicate_paper import EOS, Config, score, test_ids, train, train_tokenizer  # noqa: E402

from convert import convert_checkpoint  # noqa: E402


def init_pythia(cfg: Config, tokenizer, folder: Path, rotary_pct: float) -> int:
    """A randomly initialised Pythia-layout GPT-NeoX saved beside the tokenizer; returns its parameter count."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.block_size,
        rotary_pct=rotary_pct,
        use_parallel_residual=True,
        tie_word_embeddings=False,  # Pythia keeps a separate output head, `embed_out`
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(cfg.pretrain_seed)
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=os.environ.get("GQA_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--work", default=None, help="scratch folder (default: OUT/work, removed at the end)")
    p.add_argument("--pretrain-tokens", type=int, default=400_000)
    p.add_argument("--alpha", type=float, default=0.05, help="uptraining tokens as a fraction of pretraining")
    p.add_argument("--groups", default="1,2")
    p.add_argument("--methods", default="mean,first,random,calibrated")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of pretraining")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        pretrain_tokens=args.pretrain_tokens,
        block_size=args.block,
        micro_batch_size=8,
        lr=args.lr,
        calibration_tokens=4096,
    )
    data = Path(args.data) / "wikitext-2" / "valid.txt"
    test = Path(args.data) / "wikitext-2" / "test.txt"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    tok = train_tokenizer(data, cfg.vocab_size, work / "tokenizer")
    ids, eval_info = test_ids(tok, test, cfg.block_size, args.eval_windows)
    params = init_pythia(cfg, tok, work / "init", rotary_pct=0.25)
    log(f"pythia layout: {params / 1e6:.2f}M parameters; pretraining {cfg.pretrain_tokens:,} tokens")
    init_ppl = score(work / "init", ids, cfg.block_size)["ppl"]
    train(cfg, work / "init", work / "pre", data, 0, cfg.lr, {"tokens": cfg.pretrain_tokens})
    source = work / "pre" / "model"
    mha = score(source, ids, cfg.block_size)["ppl"]
    log(f"MHA gpt_neox: ppl {mha:.2f} (random init {init_ppl:.2f})")
    convert_checkpoint(source, work / "phi-mha", cfg.num_heads, progress=False)
    same = score(work / "phi-mha", ids, cfg.block_size)["ppl"]
    log(f"re-expressed as phi, {cfg.num_heads} KV heads: ppl {same:.2f}")
    up_tokens = int(args.alpha * cfg.pretrain_tokens)
    rows = []
    for g in [int(x) for x in args.groups.split(",")]:
        for method in args.methods.split(","):
            folder = work / f"g{g}-{method}"
            options = {}
            if method == "calibrated":
                options = dict(calibration_data=str(data), calibration_tokens=cfg.calibration_tokens)
            t0 = time.time()
            convert_checkpoint(source, folder, g, method=method, progress=False, method_options=options or None)
            seconds = time.time() - t0
            before = score(folder, ids, cfg.block_size)["ppl"]
            lr = cfg.uptrain_peak_lr
            train(cfg, folder, work / f"up-g{g}-{method}", data, 0, lr, {"tokens": up_tokens})
            after = score(work / f"up-g{g}-{method}" / "model", ids, cfg.block_size)["ppl"]
            rows.append(dict(groups=g, method=method, ppl_converted=before, ppl_uptrained=after, convert_s=seconds))
            log(f"G={g} {method}: {before:.2f} -> {after:.2f} after {up_tokens:,} uptraining tokens")
            shutil.rmtree(folder)
            shutil.rmtree(work / f"up-g{g}-{method}")
    # The control: the MHA source trained on for the same budget.
    train(cfg, source, work / "up-mha", data, 0, cfg.uptrain_peak_lr, {"tokens": up_tokens})
    mha_up = score(work / "up-mha" / "model", ids, cfg.block_size)["ppl"]
    results = {
        "command": "python bench/mha_families.py " + " ".join(argv),
        "model": dict(
            layout="gpt_neox, use_parallel_residual=true, rotary_pct=0.25, untied embed_out",
            parameters=params,
            hidden=cfg.hidden_size,
            layers=cfg.num_layers,
            heads=cfg.num_heads,
            vocab=len(tok),
        ),
        "pretrain_tokens": cfg.pretrain_tokens,
        "uptrain_tokens": up_tokens,
        "uptrain_peak_lr": cfg.uptrain_peak_lr,
        "eval": eval_info,
        "init_ppl": init_ppl,
        "mha_ppl": mha,
        "mha_uptrained_ppl": mha_up,
        "phi_reexpressed_ppl": same,
        "rows": rows,
        "wall_seconds": time.time() - start,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| model | converted | after uptraining |",
        "|---|---|---|",
        f"| MHA gpt_neox (source; control trained on) | {mha:.2f} | {mha_up:.2f} |",
        f"| phi, {cfg.num_heads} KV heads (re-expression only) | {same:.2f} | - |",
    ]
    for r in rows:
        name = "MQA" if r["groups"] == 1 else f"GQA-{r['groups']}"
        lines.append(f"| phi {name}, {r['method']} | {r['ppl_converted']:.2f} | {r['ppl_uptrained']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    log(f"done: {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
