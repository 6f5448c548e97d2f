"""The analysis half of bench/replicate_paper.py: the grid's settings, the paper's claims checked on the numbers,
the results table and the two figures. Pure functions of results.json (no training), so they can be re-run on a
stored results.json and tested on known numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from convert.figures import new_figure, save_figure
from convert.formatting import duration

# ============================================================================================== settings


@dataclass
class Config:
    # model
    arch: str = "llama"  # llama (decoder-only, next-token) or t5 (T5.1.1 encoder-decoder, span corruption)
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    # pretraining and uptraining recipe (shared)
    pretrain_tokens: int = 1_000_000
    block_size: int = 256
    micro_batch_size: int = 8
    lr: float = 1e-3
    uptrain_lr: float | None = None  # default: where pretraining's schedule ended, min_lr_ratio x lr (see above)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    pretrain_seed: int = 0
    # the grid
    groups: list[int] = field(default_factory=lambda: [1, 2, 4])
    methods: list[str] = field(default_factory=lambda: ["mean", "first", "random", "calibrated"])
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.05, 0.10])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    headline_alpha: float = 0.05
    headline_methods: list[str] = field(default_factory=lambda: ["mean"])
    control: bool = True  # MHA trained on for the same budgets
    calibration_tokens: int = 8192
    # evaluation
    eval_windows: int = 96  # windows of block_size tokens, evenly spaced over the test file (0 = all)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def uptrain_peak_lr(self) -> float:
        return self.uptrain_lr if self.uptrain_lr is not None else self.min_lr_ratio * self.lr


QUICK = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=172,
    num_layers=2,
    num_heads=4,
    pretrain_tokens=160_000,
    block_size=128,
    micro_batch_size=8,
    lr=3e-3,
    groups=[1],
    methods=["mean", "random"],
    alphas=[0.0, 0.05],
    seeds=[0],
    headline_methods=["mean"],
    control=False,
    calibration_tokens=1024,
    eval_windows=32,
)


# --arch t5 --quick: the same tiny model as T5.1.1 (2 encoder + 2 decoder blocks), inputs of 64 tokens (a row is
# 64 inputs + 14 targets); mean and random at MQA, alpha 0 and 5%
QUICK_T5 = {**QUICK, "block_size": 64, "pretrain_tokens": 120_000, "eval_windows": 48}


def parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: --{name} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: --{name} is empty")
    return values


def parse_alpha(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def pct(alpha: float) -> str:
    return f"{alpha * 100:g}%"


def g_name(g: int, heads: int) -> str:
    return "MQA" if g == 1 else f"GQA-{g}"


# ============================================================================================== analysis


def aggregate(rows: list[dict]) -> dict:
    """{(kind, groups, method, alpha): {"ppl": mean over seeds, "spread": (max - min) / 2, "n": seeds, ...}}."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["kind"], r["groups"], r["method"], r["alpha"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        ppls = [r["ppl"] for r in rs]
        # mean of log perplexity (mean NLL) across seeds, shown as a perplexity
        mean_ppl = math.exp(sum(math.log(p) for p in ppls) / len(ppls))
        out[key] = {
            "ppl": mean_ppl,
            "spread": (max(ppls) - min(ppls)) / 2,
            "n": len(ppls),
            "seeds": [r["seed"] for r in rs],
            "values": ppls,
        }
    return out


def lookup(agg: dict, kind: str, g: int, method: str, alpha: float) -> dict | None:
    return agg.get((kind, g, method, alpha))


def check_claims(agg: dict, cfg: Config, methods: list[str]) -> list[dict]:
    """The paper's qualitative claims, each with the numbers it rests on and whether it holds here.

    Thresholds (stated so that the verdicts can be checked by hand):
      ranking      mean < first < random in perplexity at the headline alpha (and at the largest alpha), every G;
      usable       "usable right after conversion" = test perplexity at alpha = 0 within 1.5x the MHA model's;
      diminishing  most of the 0 -> 10% gain in log perplexity is reached at 5% (more than half), and the gain from
                   5% to 10% is smaller than the gain from 0 to 5%;
      close        at alpha = 5%, mean-pooled GQA within 5% of the MHA model's perplexity.
    """
    mha = lookup(agg, "mha", cfg.num_heads, "-", 0.0)["ppl"]
    claims = []
    ha, top = cfg.headline_alpha, max(cfg.alphas)
    g_all = cfg.groups

    # 1. mean > first > random after uptraining
    order = [m for m in ("mean", "first", "random") if m in methods]
    if len(order) >= 2 and ha > 0:
        details, holds = [], True
        for alpha in sorted({ha, top}):
            for g in g_all:
                vals = [lookup(agg, "gqa", g, m, alpha) for m in order]
                if any(v is None for v in vals):
                    continue
                ok = all(a["ppl"] < b["ppl"] for a, b in zip(vals, vals[1:]))
                holds &= ok
                details.append(
                    f"{g_name(g, cfg.num_heads)} at {pct(alpha)}: "
                    + ", ".join(f"{m} {v['ppl']:.2f}" for m, v in zip(order, vals))
                    + (" (in order)" if ok else " (order broken)")
                )
        claims.append(
            {
                "claim": f"after uptraining, {' > '.join(order)} (lower perplexity is better)",
                "holds": holds if details else None,
                "details": details,
            }
        )

    # 2. GQA usable right after conversion, MQA needs uptraining
    if "mean" in methods and 0.0 in cfg.alphas:
        details, gqa_ok, mqa_needs = [], None, None
        for g in g_all:
            v = lookup(agg, "gqa", g, "mean", 0.0)
            if v is None:
                continue
            ratio = v["ppl"] / mha
            usable = ratio <= 1.5
            details.append(
                f"{g_name(g, cfg.num_heads)} mean at 0%: {v['ppl']:.2f} = {ratio:.2f}x MHA "
                f"({'usable' if usable else 'not usable'})"
            )
            if g == 1:
                mqa_needs = not usable
            else:
                gqa_ok = usable if gqa_ok is None else (gqa_ok and usable)
        holds = None if gqa_ok is None or mqa_needs is None else (gqa_ok and mqa_needs)
        if gqa_ok is None and mqa_needs is not None:
            holds = mqa_needs  # only MQA in the grid: its half of the claim
        claims.append(
            {
                "claim": "GQA is usable right after conversion (within 1.5x MHA perplexity, mean pooling), "
                "MQA needs uptraining",
                "holds": holds,
                "details": details,
            }
        )

    # 3. gains from 5% with diminishing returns at 10%
    if {0.0, 0.05, 0.10} <= set(cfg.alphas) and "mean" in methods:
        details, holds = [], True
        for g in g_all:
            p0, p5, p10 = (lookup(agg, "gqa", g, "mean", a) for a in (0.0, 0.05, 0.10))
            if None in (p0, p5, p10):
                continue
            gain_5 = math.log(p0["ppl"]) - math.log(p5["ppl"])
            gain_10 = math.log(p5["ppl"]) - math.log(p10["ppl"])
            share = gain_5 / (gain_5 + gain_10) if gain_5 + gain_10 > 0 else float("nan")
            ok = gain_5 > 0 and gain_10 < gain_5 and share > 0.5
            holds &= ok
            details.append(
                f"{g_name(g, cfg.num_heads)} mean: {p0['ppl']:.2f} -> {p5['ppl']:.2f} (5%) -> "
                f"{p10['ppl']:.2f} (10%); {share:.0%} of the 0-10% gain (log ppl) reached at 5%"
            )
        claims.append(
            {
                "claim": "uptraining gains by 5%, with diminishing returns from 5% to 10%",
                "holds": holds if details else None,
                "details": details,
            }
        )

    # 4. GQA close to MHA at 5%
    if 0.05 in cfg.alphas and "mean" in methods:
        details, holds = [], True
        control = lookup(agg, "control", cfg.num_heads, "-", 0.05)
        for g in [g for g in g_all if g > 1] or g_all:
            v = lookup(agg, "gqa", g, "mean", 0.05)
            if v is None:
                continue
            ratio = v["ppl"] / mha
            ok = ratio <= 1.05
            holds &= ok
            more = (
                f", {v['ppl'] / control['ppl']:.3f}x the MHA trained on for 5% ({control['ppl']:.2f})"
                if control
                else ""
            )
            details.append(
                f"{g_name(g, cfg.num_heads)} mean at 5%: {v['ppl']:.2f} = {ratio:.3f}x MHA ({mha:.2f}){more}"
            )
        claims.append(
            {
                "claim": "GQA uptrained for 5% is close to MHA (within 5% perplexity)",
                "holds": holds if details else None,
                "details": details,
            }
        )
    return claims


def fmt_cell(v: dict | None) -> str:
    if v is None:
        return "–"
    text = f"{v['ppl']:.2f}"
    if v["n"] > 1:
        text += f" ± {v['spread']:.2f} (n={v['n']})"
    return text


def model_words(cfg: Config) -> str:
    if cfg.arch == "t5":
        return (
            f"T5.1.1 (gated-gelu, untied head, relative position bias), {cfg.num_layers} encoder + {cfg.num_layers} "
            f"decoder blocks, d_model {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}; GQA/MQA in the "
            f"decoder's self- and cross-attention, the encoder left multi-head"
        )
    return f"llama, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}"


def row_words(cfg: Config, ev: dict) -> str:
    """The tokens of one training row (a span-corruption row counts its inputs and its targets)."""
    if cfg.arch == "t5":
        return f"({ev['window']} inputs + {ev['target_length']} targets, span corruption)"
    return str(cfg.block_size)


def score_words(cfg: Config, ev: dict) -> str:
    if cfg.arch == "t5":
        return (
            f"Held-out span-corruption perplexity (exp of the loss per target token; {ev['objective']}; "
            f"'windows' are examples of {ev['window']} input and {ev['target_length']} target tokens)"
        )
    return "Test perplexity"


def markdown(results: dict) -> str:
    cfg = Config(**results["config"])
    agg = {tuple(k): v for k, v in ((tuple(json.loads(k)), v) for k, v in results["aggregate"].items())}
    methods = results["methods"]
    alphas = cfg.alphas
    pre, ev = results["pretrain"], results["eval"]
    lines = [
        f"# GQA replication ({'quick' if results['quick'] else 'full'} run)",
        "",
        f"Command: `{results['command']}`  ",
        f"Hardware: {results['hardware']['summary']}  ",
        f"Wall time: {duration(results['wall_seconds'])}"
        + (f" ({results['cells_reused']} cells reused from an earlier run)" if results["cells_reused"] else ""),
        "",
        f"Model: {model_words(cfg)}, "
        f"{pre['parameters']:,} parameters, byte-level BPE of {results['tokenizer']['vocab_size']:,} tokens trained "
        f"on `{Path(results['data']).name}`. Pretrained from scratch with `convert.uptrain` for "
        f"{pre['tokens']:,} tokens ({pre['steps']} steps of {cfg.micro_batch_size} x {row_words(cfg, ev)}, peak lr "
        f"{cfg.lr}, warmup {cfg.warmup_ratio:.0%}, cosine to {cfg.min_lr_ratio} x lr). Uptraining: the same recipe "
        f"(peak lr {cfg.uptrain_peak_lr:g}, where pretraining's schedule ended) for alpha x {pre['tokens']:,} tokens.",
        "",
        f"{score_words(cfg, ev)} on `{Path(ev['file']).name}`: {ev['windows']} windows of {ev['window']} tokens "
        f"(stride {ev['stride']}, evenly spaced over the file's {ev['windows_in_file']}), {ev['tokens_scored']:,} "
        f"tokens scored. Lower is better. ± is half the range (max - min) / 2 over n seeds; cells without n ran once "
        f"(seed {cfg.seeds[0]}); multi-seed cells show the geometric mean.",
        "",
        "| model | KV heads | " + " | ".join(f"α = {pct(a)}" for a in alphas) + " |",
        "|---|---|" + "---|" * len(alphas),
        f"| random init (no training) | {cfg.num_heads} | {pre['init_ppl']:.1f} |" + " |" * (len(alphas) - 1),
    ]
    mha_row = [fmt_cell(lookup(agg, "mha", cfg.num_heads, "-", 0.0))]
    for a in alphas[1:]:
        mha_row.append(fmt_cell(lookup(agg, "control", cfg.num_heads, "-", a)) if cfg.control else "")
    lines.append(
        f"| MHA (pretrained{'; α > 0: trained on, control' if cfg.control else ''}) | {cfg.num_heads} | "
        + " | ".join(mha_row)
        + " |"
    )
    for g in cfg.groups:
        for m in methods:
            cells = [fmt_cell(lookup(agg, "gqa", g, m, a)) for a in alphas]
            lines.append(f"| {g_name(g, cfg.num_heads)} {m} | {g} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims", ""]
    for c in results["claims"]:
        verdict = {True: "**holds**", False: "**does not hold**", None: "not tested"}[c["holds"]]
        lines.append(f"- {c['claim']}: {verdict}")
        lines += [f"  - {d}" for d in c["details"]]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += ["", "![conversion methods](fig_methods.png)", "", "![perplexity against alpha](fig_alpha.png)", ""]
    return "\n".join(lines)


COLORS = {"mean": "tab:blue", "first": "tab:orange", "random": "tab:green", "calibrated": "tab:purple"}


def perplexity_axis(ax, values: list[float]) -> None:
    """Log scale with plain 1-2-5 labels when the values span a factor of 3 or more; linear otherwise."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if v and math.isfinite(v)]
    if values and max(values) / min(values) >= 3:
        ax.set_yscale("log")
        if max(values) / min(values) >= 1e4:  # untrained conversions (T5 first/random): decades, labelled 1e+N
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
        else:
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("test perplexity (log scale)")
    else:
        ax.set_ylabel("test perplexity")


def plot_methods(results: dict, path: Path) -> None:
    """Figure 4's shape: perplexity of each conversion method, per G, at alpha = 0 and at the headline alpha."""
    cfg = Config(**results["config"])
    agg = {tuple(json.loads(k)): v for k, v in results["aggregate"].items()}
    methods, mha = results["methods"], results["pretrain"]["ppl"]
    panels = [a for a in sorted({0.0, cfg.headline_alpha}) if a in cfg.alphas]
    fig, axes = new_figure(nrows=1, ncols=len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110, squeeze=False)
    width = 0.8 / len(methods)
    for ax, alpha in zip(axes[0], panels):
        shown: list[float] = []
        for mi, m in enumerate(methods):
            xs, ys, errs = [], [], []
            for gi, g in enumerate(cfg.groups):
                v = lookup(agg, "gqa", g, m, alpha)
                if v is None:
                    continue
                xs.append(gi + (mi - (len(methods) - 1) / 2) * width)
                ys.append(v["ppl"])
                errs.append(v["spread"] if v["n"] > 1 else 0)
            bars = ax.bar(xs, ys, width, yerr=errs if any(errs) else None, capsize=3, label=m, color=COLORS.get(m))
            ax.bar_label(bars, [f"{y:.1f}" for y in ys], fontsize=7, padding=2)
            shown.extend(ys)
        ax.axhline(mha, color="black", ls="--", lw=1, label=f"MHA {mha:.1f}")
        ax.set_xticks(range(len(cfg.groups)), [g_name(g, cfg.num_heads) for g in cfg.groups])
        perplexity_axis(ax, shown + [mha])
        if ax.get_yscale() == "linear":
            ax.set_ylim(0, max(shown + [mha]) * 1.12)
        ax.set_title("right after conversion (α = 0)" if alpha == 0 else f"uptrained, α = {pct(alpha)}")
        ax.grid(axis="y", alpha=0.3, which="both")
    save_figure(fig, path, "Conversion methods (cf. GQA paper, figure 4)", legend_from=axes[0][0], legend_height=0.06)


def plot_alpha(results: dict, path: Path) -> None:
    """Figure 5's shape: perplexity against the uptraining fraction, one panel per G, MHA as a reference line."""
    cfg = Config(**results["config"])
    agg = {tuple(json.loads(k)): v for k, v in results["aggregate"].items()}
    methods, mha = results["methods"], results["pretrain"]["ppl"]
    xs = [a * 100 for a in cfg.alphas]
    fig, axes = new_figure(
        nrows=1, ncols=len(cfg.groups), figsize=(4.6 * len(cfg.groups), 4.2), dpi=110, squeeze=False, sharey=True
    )
    shown: list[float] = [mha]
    for ax, g in zip(axes[0], cfg.groups):
        for m in methods:
            pts = [(a * 100, lookup(agg, "gqa", g, m, a)) for a in cfg.alphas]
            pts = [(x, v) for x, v in pts if v is not None]
            shown.extend(v["ppl"] for _, v in pts)
            ax.errorbar(
                [x for x, _ in pts],
                [v["ppl"] for _, v in pts],
                yerr=[v["spread"] if v["n"] > 1 else 0 for _, v in pts],
                marker="o",
                ms=4,
                capsize=3,
                label=m,
                color=COLORS.get(m),
            )
        ax.axhline(mha, color="black", ls="--", lw=1, label="MHA")
        if cfg.control:
            ctrl = [(a * 100, lookup(agg, "control", cfg.num_heads, "-", a)) for a in cfg.alphas if a > 0]
            ctrl = [(0.0, {"ppl": mha})] + [(x, v) for x, v in ctrl if v is not None]
            ax.plot(
                [x for x, _ in ctrl],
                [v["ppl"] for _, v in ctrl],
                color="gray",
                ls=":",
                marker="s",
                ms=3,
                label="MHA trained on (control)",
            )
        ax.set_xticks(xs, [f"{x:g}%" for x in xs])
        ax.set_xlabel("uptraining α (% of pretraining tokens)")
        ax.set_title(g_name(g, cfg.num_heads) + f" ({g} KV head{'s' if g > 1 else ''})")
        ax.grid(alpha=0.3, which="both")
    perplexity_axis(axes[0][0], shown)  # the panels share the y axis
    save_figure(
        fig,
        path,
        "Perplexity against uptraining proportion (cf. GQA paper, figure 5)",
        legend_from=axes[0][0],
        legend_height=0.07,
    )
