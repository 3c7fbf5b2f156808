"""A saved personalization run: its validation prompts sampled again with the trained adapter and scored, and new
prompts x seeds drawn with it.

Scores: CLIP-T (each image against its prompt) and CLIP-I (images against the subject's own images) with an open_clip
model already on the machine (:func:`~visionpeft.metrics.clip_scores.local_clip_scorer`: nothing is downloaded), and,
when the run's pipeline is the embedded ``checkpoints/tiny_sd``, its judge: the share of samples it names as what it
names the subject's images. Sampling is the trainer's own (:meth:`PersonalizationObjective.draw`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from ..data.few_images import load_images
from ..errors import DataError
from .personalization import PersonalizationObjective
from .saved_run import (
    EvalRequest,
    PredictRequest,
    adapted_pipeline,
    adapter_dir,
    check_outputs,
    eval_folder,
    output_folder,
    png_bytes,
    slug,
    write_new,
)


def _sampler(config: DictConfig, adapter: Path, cpu: bool, check_base: bool):
    """(the trainer's objective around the run's pipeline with ``adapter`` loaded, an accelerator)."""
    pipeline, accelerator = adapted_pipeline(config.model, adapter, cpu, check_base)
    return PersonalizationObjective(pipeline, config, adapter.parent), accelerator


def run_prompts(config: DictConfig) -> list[str]:
    """The run's validation prompts, else its training caption (``data.prompt`` with the token)."""
    return list(config.train.validation_prompts) or [config.data.prompt.format(config.token)]


def embedded_pipeline(config: DictConfig) -> bool:
    """Whether the run adapted the embedded ``checkpoints/tiny_sd`` (the pipeline the judge knows)."""
    from ..demo.judge import JUDGE_FILE

    return Path(config.model.name).expanduser().resolve() == (JUDGE_FILE.parent / "tiny_sd").resolve()


def judge_score(images: list, references: list) -> str:
    """The judge's share of ``images`` named as it names most of the subject's ``references``."""
    from ..demo.judge import Judge

    judge = Judge.load()
    subject = Counter(judge.predict(references)).most_common(1)[0][0]
    named = judge.predict(images)
    share = sum(name == subject for name in named) / len(named)
    return f"judge {100 * share:.0f}% '{subject}' (what it calls the subject's images)"


def evaluate(config: DictConfig, request: EvalRequest) -> list[str]:
    """Samples the validation prompts (``--samples`` images each) into the eval folder and scores them."""
    from ..metrics.clip_scores import local_clip_scorer

    scorer, clip = local_clip_scorer(request.clip)  # a wrong --clip is one line before any work
    try:
        references = load_images(config.data.images) if config.data.images else []
        missing_references = "" if references else "no data.images"
    except DataError as err:
        references, missing_references = [], str(err)
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    objective, accelerator = _sampler(config, adapter, request.cpu, request.check_base)
    out = eval_folder(request, adapter.name)
    prompts = run_prompts(config)
    drawn = objective.draw(accelerator, prompts, request.samples)
    images, image_prompts = [], []
    for p, (prompt, group) in enumerate(zip(prompts, drawn)):
        for i, image in enumerate(group):
            image.save(out / f"{p:02d}_{i}.png")
        images += group
        image_prompts += [prompt] * len(group)
    scores, notes = [], []
    if scorer is None:
        notes.append(f"CLIP-T / CLIP-I not scored: {clip}")
    else:
        scores.append(f"CLIP-T {scorer.clip_t(images, image_prompts):.4f}")
        if references:
            scores.append(f"CLIP-I {scorer.clip_i(images, references):.4f} ({clip})")
        else:
            notes.append(f"CLIP-I not scored: {missing_references}")
    if not embedded_pipeline(config):
        notes.append(f"judge not run: it knows the embedded checkpoints/tiny_sd only, not {config.model.name}")
    elif not references:
        notes.append(f"judge not run: {missing_references}")
    else:
        scores.append(judge_score(images, references))
    head = f"{request.run_dir} [{adapter.name}] {len(images)} images of {len(prompts)} prompt(s) in {out}"
    return [head + (": " + ", ".join(scores) if scores else ""), *notes]


def predict(config: DictConfig, request: PredictRequest) -> list[str]:
    """One image per (prompt, seed) into ``request.out``: ``NN_<prompt>_seedS.png``."""
    prompts = request.prompt or run_prompts(config)
    seeds = request.seeds or [config.train.seed]
    out = output_folder(request.out)
    names = [(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in seeds]
    paths = [out / f"{p:02d}_{slug(prompt)}_seed{seed}.png" for p, prompt, seed in names]
    check_outputs(paths, [], request.overwrite)
    adapter = adapter_dir(request.run_dir, request.checkpoint)
    objective, accelerator = _sampler(config, adapter, request.cpu, request.check_base)
    for (_, prompt, seed), path in zip(names, paths):
        image = objective.draw(accelerator, [prompt], 1, seed)[0][0]
        write_new(path, png_bytes(image), request.overwrite)
    return [f"wrote {len(paths)} image(s) ({len(prompts)} prompt(s) x {len(seeds)} seed(s)) to {out} ({adapter.name})"]
