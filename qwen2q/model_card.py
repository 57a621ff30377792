"""The README.md (model card) of a checkpoint qwen2q writes: what it is, then the source's card.

A quantized checkpoint must not pass itself off as its source: its card says, first, which model it was
made from, by which method and tool, how many bits each quantized weight costs, what loads it, and how
to measure its drift; then the source's own card follows unchanged under "Original model card".  The
source's YAML front matter (license, language, ...) is kept, with `base_model` and
`base_model_relation: quantized` added when absent, as the Hugging Face hub reads them.
"""
from __future__ import annotations

FRONT = "---\n"


def split_front_matter(card: str) -> tuple[list[str], str]:
    """(front matter lines without the --- fences, the card's body) of a model card."""
    if card.startswith(FRONT):
        end = card.find("\n---", len(FRONT) - 1)
        if end != -1:
            body_start = card.find("\n", end + 4)
            return card[len(FRONT):end].splitlines(), card[body_start + 1:] if body_start != -1 else ""
    return [], card


def quantized_card(source_card: str | None, source_name: str, method: str, bits_per_weight: float,
                   loads_in: str, version: str, head_quantized: bool = False) -> str:
    """The card of a checkpoint quantized from `source_name` by `method` (as `qwen2q info` shows it);
    `head_quantized`: lm_head has a format too (mixed precision)."""
    front, body = split_front_matter(source_card or "")
    keys = {line.split(":", 1)[0].strip() for line in front if ":" in line and not line.startswith(" ")}
    if "base_model" not in keys:
        front.append(f"base_model: {source_name}")
    if "base_model_relation" not in keys:
        front.append("base_model_relation: quantized")
    lines = [
        FRONT + "\n".join(front) + "\n---",
        "",
        f"# {source_name}, quantized ({method})",
        "",
        f"This checkpoint is `{source_name}` quantized by qwen2q {version}: {method}, "
        f"{bits_per_weight:.3f} bits per quantized weight (scales, zeros and statistics included).  "
        + ("The embeddings keep the source's precision; lm_head is quantized too." if head_quantized else
           "The embeddings and lm_head keep the source's precision."),
        "",
        f"It loads in {loads_in}.  Its drift from the source is not measured at quantize time; measure it with",
        "",
        "```bash",
        f"qwen2q eval THIS_FOLDER --reference {source_name} --seq-len 512 --max-windows 32",
        "```",
        "",
        "## Original model card",
        "",
        body.strip() if body.strip() else f"(`{source_name}` came without a model card.)",
        "",
    ]
    return "\n".join(lines)
