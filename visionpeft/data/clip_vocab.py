"""A transformers ``CLIPTokenizer`` built offline from the CLIP BPE vocabulary that ships inside open_clip.

Stable Diffusion 1.x / 2.x pipelines use the same 49,408-token vocabulary; with this, a pipeline (or a test) can be
assembled on a machine with no model hub.
"""

from __future__ import annotations

import json
from pathlib import Path


def clip_tokenizer(directory: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """Writes ``vocab.json`` + ``merges.txt`` into ``directory`` and returns the tokenizer reading them (SDXL's
    second tokenizer pads with ``"!"``)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    specials = ("<start_of_text>", "<end_of_text>")
    vocab = {k: v for k, v in simple.encoder.items() if k not in specials}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
