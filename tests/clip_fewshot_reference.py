"""What the tests of the few-shot CLIP methods after CoOp share (KgCoOp, ProGrad, CLIP-Adapter, Tip-Adapter): fixed
inputs, the official CLIP text encoder written out on an open_clip model's weights, and a reload of saved adapters in
a new Python process.

The text encoder is the official ``TextEncoder.forward`` of the CoOp family (htyao89/KgCoOp
``KgCoOp/trainers/kgcoop.py`` lines 68-79; BeierZhu/Prompt-align ``ProGrad.public/trainers/prograd.py`` lines
51-63): prompt embeddings + positional embedding, the transformer (causal mask), ``ln_final``, the end-of-text token
(``tokenized_prompts.argmax(-1)``) ``@ text_projection``.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

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
CONTEXT = 32  # tiny_clip_bpe's context length


def tokens_of(texts: list[str]) -> torch.Tensor:
    return clip_tokenize(list(texts), CONTEXT)


def official_text_features(clip, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``TextEncoder.forward(prompts, tokenized_prompts)`` on ``clip``'s weights (unnormalised)."""
    x = prompts + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def hand_crafted(clip, template: str, names=NAMES) -> torch.Tensor:
    """Normalised features of one hand-crafted prompt per class (the official ``clip_model.encode_text`` + norm)."""
    tokens = tokens_of([template.format(name) for name in names])
    return F.normalize(official_text_features(clip, clip.token_embedding(tokens), tokens), dim=-1)


def prompt_embeddings(clip, ctx: torch.Tensor, prefix: str, names=NAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``PromptLearner.forward`` (class token at the end): the embeddings of ``"{prefix} {name}."``
    with tokens ``1 .. n_ctx`` replaced by ``ctx`` (n_ctx, width); also the tokens."""
    tokens = tokens_of([f"{prefix} {name}." for name in names])
    embedding = clip.token_embedding(tokens)
    n = ctx.shape[0]
    ctx = ctx.unsqueeze(0).expand(len(names), -1, -1)
    return torch.cat([embedding[:, :1], ctx, embedding[:, 1 + n :]], dim=1), tokens


RELOAD = """
import sys
sys.path.insert(0, {tests!r})
import torch
import visionpeft as vp
from clip_fewshot_reference import IMAGES
from tiny_models import tiny_clip_bpe
from visionpeft.tasks import CLIPClassifier
outputs = []
for folder, names in {adapters!r}:
    model = vp.load_adapter(CLIPClassifier(tiny_clip_bpe(), names), folder).eval()
    with torch.no_grad():
        outputs.append(model(IMAGES))
torch.save(outputs, {out!r})
"""


def logits_in_new_process(adapters: list[tuple[Path, tuple[str, ...]]], scratch: Path) -> list[torch.Tensor]:
    """What a new Python process gets from ``vp.load_adapter(CLIPClassifier(tiny_clip_bpe(), names), folder)`` on
    ``IMAGES``, for each ``(folder, names)``."""
    root = Path(__file__).resolve().parents[1]
    shown = [(str(folder), tuple(names)) for folder, names in adapters]
    script = RELOAD.format(tests=str(root / "tests"), adapters=shown, out=str(scratch / "reloaded.pt"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(scratch / "reloaded.pt")


def coloured_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eight 32 px images, each a colour of its own plus a little noise (a random tiny CLIP maps plain noise images to
    nearly one feature, which no method acting on the image feature alone can separate), labels 0 .. 7."""
    g = torch.Generator().manual_seed(seed)
    images = 0.2 * torch.randn(8, 3, 32, 32, generator=g) + 2.0 * torch.randn(8, 3, 1, 1, generator=g)
    return images, torch.arange(8)


def objective_losses(model, steps: int = 10, lr: float = 1e-2, seed: int = 0, batch=None) -> list[float]:
    """``tiny_models.training_losses`` through the classification trainer's objective (cross-entropy plus the
    methods' ``regularization_loss``): the loss of ``steps`` AdamW steps on one fixed batch (default: 8 noise images
    of 32 px, labels of 10 classes)."""
    import visionpeft as vp
    from visionpeft.trainers.classification import ClassificationObjective

    if batch is None:
        generator = torch.Generator().manual_seed(seed)
        batch = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 10
    objective = ClassificationObjective(10, None, adapted=model)
    optimizer = torch.optim.AdamW([p for _, p in vp.trainable_parameters(model)], lr=lr)
    vp.set_train_mode(model, True)
    losses = []
    for _ in range(steps):
        loss = objective.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
