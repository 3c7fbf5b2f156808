"""The official forward passes of MaPLe / IVLP / PromptSRC, written out for the tests on an open_clip model's frozen
weights (functional calls on its layers, so no hook of an attached method runs), and the tiny CLIP they run on.

Official code: muzairkhattak/multimodal-prompt-learning (commit 69bce21) ``clip/model.py``:

* vision (``VisionTransformer.forward`` lines 393-422, ``VisionTransformer_MaPLe.forward`` lines 445-476): patch
  embedding, class token, position embedding, then the shallow prompt appended AFTER the patch tokens
  (``torch.cat([x, visual_ctx], dim=1)``, lines 404-406 / 456-458), ``ln_pre``, the blocks, ``ln_post`` of the class
  token, ``@ proj``;
* vision blocks (``ResidualAttentionBlock_IVLP.forward`` lines 229-256, ``ResidualAttentionBlock_MaPLe.forward`` lines
  287-331): blocks ``1 .. J-1`` drop the last ``n`` tokens and append their own prompt (``x[0 : L - n]`` then
  ``torch.cat([prefix, visual_context])``), then ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``;
* text blocks (same lines, ``text_layer``): ``torch.cat([x[:1], textual_context, x[1 + n:]])``;
* text encoder (``trainers/maple.py`` ``TextEncoder.forward`` lines 52-66, ``trainers/independentVL.py`` lines
  51-62): prompts + positional embedding, the blocks (causal mask), ``ln_final``, the end-of-text token
  (``tokenized_prompts.argmax(-1)``) ``@ text_projection``;
* the class prompt (``MultiModalPromptLearner`` lines 84-131 / ``VLPromptLearner`` lines 82-114): the embeddings of
  ``"{ctx_init} {class}."`` with tokens ``1 .. n`` replaced by the context vectors.
"""

from __future__ import annotations

import math
from functools import partial

import tiny_models
import torch
import torch.nn.functional as F

from visionpeft.backbones.open_clip import clip_tokenize

#: the trained state these tests compare: seeded noise of std 0.05 on every trained tensor
perturb = partial(tiny_models.perturb, std=0.05, seed=3)

NAMES = ("golden retriever", "tabby cat", "fire truck")
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
LABELS = torch.tensor([0, 1, 2, 0])
#: Ten class names for ``tiny_models.training_losses`` (labels 0 .. 9).
TEN_NAMES = ("dog", "cat", "truck", "apple", "river", "chair", "violin", "tiger", "bridge", "cloud")


def tiny_clip_deep(seed: int = 0, batch_first: bool = True) -> torch.nn.Module:
    """A tiny open_clip CLIP with 3 blocks per tower, a vision width (48) other than the text width (32), the real BPE
    vocabulary; optionally sequence-first blocks (open_clip's older layout)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=3, width=48, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=32, vocab_size=49408, width=32, heads=2, layers=3),
    )
    if not batch_first:
        for transformer in (model.visual.transformer, model.transformer):
            transformer.batch_first = False
            for blk in transformer.resblocks:
                blk.attn.batch_first = False
    return model.eval()


def attention(blk, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``nn.MultiheadAttention(x, x, x)`` of a block written out on (batch, tokens, width)."""
    attn = blk.attn
    heads, width = attn.num_heads, x.shape[-1]
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, width // heads)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def block(blk, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    x = x + attention(blk, blk.ln_1(x), mask)
    return x + blk.mlp(blk.ln_2(x))


def official_image_features(clip, images: torch.Tensor, shallow: torch.Tensor | None, deep: list) -> torch.Tensor:
    """Unnormalised image features with ``shallow`` (n, width) appended after the patches and ``deep[i]`` replacing
    the last n tokens at the input of block ``i + 1``."""
    visual = clip.visual
    x = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
    if shallow is not None:
        x = torch.cat([x, shallow.expand(x.shape[0], -1, -1)], dim=1)
    x = layer_norm(x, visual.ln_pre)  # a hook of the method sits on ln_pre: the reference calls none
    for i, blk in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):
            prompt = deep[i - 1]
            x = torch.cat([x[:, : x.shape[1] - prompt.shape[0]], prompt.expand(x.shape[0], -1, -1)], dim=1)
        x = block(blk, x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def official_prompt_embeddings(clip, ctx: torch.Tensor, ctx_init: str = "a photo of a", names=NAMES):
    """(embeddings, tokens) of the class prompts ``"{ctx_init} {class}."`` with tokens 1 .. n set to ``ctx``."""
    tokens = clip_tokenize([f"{ctx_init} {name}." for name in names], clip.context_length)
    embeddings = clip.token_embedding(tokens)
    embeddings = torch.cat([embeddings[:, :1], ctx.expand(len(names), -1, -1), embeddings[:, 1 + ctx.shape[0] :]], 1)
    return embeddings, tokens


def official_text_features(clip, embeddings: torch.Tensor, tokens: torch.Tensor, deep: list) -> torch.Tensor:
    """Unnormalised text features; ``deep[i]`` replaces tokens 1 .. n at the input of text block ``i + 1``."""
    x = embeddings + clip.positional_embedding
    for i, blk in enumerate(clip.transformer.resblocks):
        if 1 <= i <= len(deep):
            prompt = deep[i - 1]
            x = torch.cat([x[:, :1], prompt.expand(x.shape[0], -1, -1), x[:, 1 + prompt.shape[0] :]], dim=1)
        x = block(blk, x, clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def clip_logits(clip, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``logit_scale * cos(image, text)`` (``CustomCLIP.forward``)."""
    return clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


RELOAD = """
import sys
import torch
sys.path.insert(0, {tests!r})
from vl_prompt_reference import IMAGES, NAMES, tiny_clip_deep
import visionpeft as vp
from visionpeft.tasks import CLIPClassifier
torch.set_num_threads(1)
model = vp.load_adapter(CLIPClassifier(tiny_clip_deep(), NAMES), {adapter!r}).eval()
with torch.no_grad():
    torch.save(model(IMAGES), {out!r})
"""


def logits_in_new_process(adapter, scratch) -> torch.Tensor:
    """What a new Python process gets from ``vp.load_adapter(CLIPClassifier(tiny_clip_deep(), NAMES), adapter)`` on
    ``IMAGES``."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = RELOAD.format(tests=str(root / "tests"), adapter=str(adapter), out=str(scratch / "out.pt"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(scratch / "out.pt")
