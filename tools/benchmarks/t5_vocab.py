"""A T5-like tokenizer built offline: a small Unigram model trained with ``tokenizers`` on a few words, with T5's
conventions (pad 0, ``</s>`` appended, ``<unk>``, Metaspace). The tiny Flux / SD3 test pipelines and the GPU suite's
Flux rows tokenize with it where the real T5 tokenizer is a hub download; its ids fit any T5 vocabulary (a step's
cost depends on the token count, padded to ``max_sequence_length``, not on the ids).
"""

from __future__ import annotations

from pathlib import Path

#: what the T5-like tokenizer's Unigram model is trained on (every prompt word of the tests)
T5_WORDS = "a photo of sks dog in bucket the cat red blue green digit seven zero one two three painting style".split()


def t5_tokenizer(directory, model_max_length: int = 512):
    """A ``T5TokenizerFast`` over a Unigram model trained on :data:`T5_WORDS` (pad 0, ``</s>`` 1 appended to every
    sequence, ``<unk>`` 2, Metaspace pre-tokenizer: T5's conventions), saved into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
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
