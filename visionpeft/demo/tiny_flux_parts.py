"""The parts of the tiny Flux-layout pipeline (``checkpoints/tiny_flux``), built offline with diffusers' /
transformers' own classes so that the saved folder loads with ``FluxPipeline.from_pretrained`` and nothing else.

- The VAE and the CLIP text encoder + tokenizer are ``checkpoints/tiny_sd``'s (trained there, frozen here): the VAE
  gets Flux's latent normalisation (``shift_factor`` = the latents' mean, ``scaling_factor`` = 1 / their std), CLIP
  takes CLIP-L's role in Flux (its pooled output feeds the transformer's ``pooled_projections``).
- ``text_encoder_2`` is a small ``T5EncoderModel`` (T5 v1.1 layout) over a T5-like tokenizer trained offline
  (:func:`t5_tokenizer`: a Unigram model over the captions' words with T5's conventions); it trains with the
  transformer.
- The transformer is a fresh ``FluxTransformer2DModel`` with no guidance embedding (FLUX.1-schnell's layout: sampling
  uses true classifier-free guidance, ``true_cfg_scale`` with ``negative_prompt=""``), over 2 x 2 packed latents.
- The scheduler is FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` config (:data:`FLUX_DEV_SCHEDULER`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

#: FLUX.1-dev's scheduler_config.json: shift 3, dynamic shifting between 0.5 and 1.15 over 256 .. 4096 image tokens
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

#: the words of the project's test prompts (the T5-like tokenizer of the random-weight test pipelines)
T5_WORDS = "a photo of sks dog in bucket the cat red blue green digit seven zero one two three painting style".split()


def flux_scheduler():
    """FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` (:data:`FLUX_DEV_SCHEDULER`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def t5_tokenizer(directory, model_max_length: int = 512, words: list[str] | None = None):
    """A ``T5TokenizerFast`` with T5's conventions (pad 0, ``</s>`` 1 appended to every sequence, ``<unk>`` 2, NFKC,
    Metaspace pre-tokenizer), saved into ``directory``. Its Unigram model is trained on :data:`T5_WORDS` (the test
    pipelines'), or, given ``words``, holds one piece per word (``▁word``) and the single letters as fallback pieces,
    so that every caption word is one token (the pretrained tiny Flux pipeline: a caption fits 16 tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    special = ["<pad>", "</s>", "<unk>"]
    if words is None:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=special, unk_token="<unk>")
    else:
        letters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
        pieces = [(s, 0.0) for s in special] + [(f"\u2581{w}", -1.0) for w in dict.fromkeys(words)]
        pieces += [("\u2581", -5.0)] + [(c, -10.0) for c in letters]
        tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    if words is None:
        tokenizer.train_from_iterator([" ".join(T5_WORDS)] * 20 + T5_WORDS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )
    fast.save_pretrained(Path(directory))
    return fast


def caption_words() -> list[str]:
    """Every word of the captioned mix's captions (held-out subjects included: a tokenizer is no training) and of the
    personalization prompts (``sks``), in first-seen order."""
    from .captioned_mix import CIRCLE_COLOURS, SUBJECTS, subject_prompt

    text = " ".join([subject_prompt(s) for s in SUBJECTS] + [f"{c} circle with {c} background" for c in CIRCLE_COLOURS])
    words = re.findall(r"[a-z]+", text.lower()) + ["sks"]
    return list(dict.fromkeys(words))


def t5_encoder(width: int, feed_forward: int, layers: int, heads: int, vocab_size: int, buckets=(32, 128)):
    """A T5 v1.1 encoder (gated GELU, no bias, relative attention: ``buckets`` = (number, max distance))."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=width // heads,
        d_ff=feed_forward,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets[0],
        relative_attention_max_distance=buckets[1],
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary dimensions per id axis (text index, row, column), even, summing to ``head_dim`` (FLUX.1: 16 + 56 + 56 of
    128: the two image axes share the rest equally)."""
    first = 2 * max(1, round(head_dim / 16))
    side = (head_dim - first) // 2 // 2 * 2
    return first + (head_dim - first - 2 * side), side, side


def build_transformer(model, latent_channels: int, text_width: int, pooled_width: int):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2 x 2 packed latents
        num_layers=model.double_layers,
        num_single_layers=model.single_layers,
        attention_head_dim=model.head_dim,
        num_attention_heads=model.heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=pooled_width,
        guidance_embeds=False,
        axes_dims_rope=rope_axes(model.head_dim),
    )


@torch.no_grad()
def flux_latent_normalisation(vae, pixels: torch.Tensor) -> dict[str, float]:
    """Sets ``shift_factor`` / ``scaling_factor`` of ``vae`` from the mean / std of its latents (modes) of ``pixels``
    (in [-1, 1]); returns both with the std."""
    latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    mean, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return {"shift_factor": mean, "scaling_factor": 1.0 / std, "latent_std": std}


def sampling_options(max_sequence_length: int, true_cfg_scale: float, size: int = 32, prompts: int = 1) -> dict:
    """What a call of the tiny Flux pipeline with ``prompts`` prompts needs beside them: the 32 px size
    (FluxPipeline's default is ``128 * vae_scale_factor``), T5's trained sequence length (the default 512 pads with
    tokens the transformer never attended to) and true classifier-free guidance against the empty prompt, one per
    prompt (no guidance embedding)."""
    return {
        "height": size,
        "width": size,
        "max_sequence_length": max_sequence_length,
        "true_cfg_scale": true_cfg_scale,
        "negative_prompt": [""] * prompts,
    }
