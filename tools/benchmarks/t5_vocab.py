"""A T5-like tokenizer built offline (:func:`visionpeft.demo.tiny_flux_parts.t5_tokenizer`): a small Unigram model
trained with ``tokenizers`` on a few words, with T5's conventions (pad 0, ``</s>`` appended, ``<unk>``, Metaspace).
The tiny Flux / SD3 test pipelines and the GPU suite's Flux rows tokenize with it where the real T5 tokenizer is a
hub download; its ids fit any T5 vocabulary (a step's cost depends on the token count, padded to
``max_sequence_length``, not on the ids)."""

from __future__ import annotations

from visionpeft.demo.tiny_flux_parts import T5_WORDS, t5_tokenizer

__all__ = ["T5_WORDS", "t5_tokenizer"]
