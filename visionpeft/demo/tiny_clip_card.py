"""Export of the pretrained tiny CLIP: an open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``
in fp16, which open_clip loads back into its fp32 model) with ``training.json`` and the model card ``README.md``.

The exported folder is loaded back through open_clip alone before the card is written; the card's zero-shot numbers
are that copy's, on the test split (never seen in pretraining).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write
from .clip_mix import HELD_OUT_PAIRS, HELD_OUT_SUBJECTS, TEMPLATES, class_names, pair_name
from .pretrain_clip import CONFIG_FILE, WEIGHTS_FILE, load_folder, zero_shot_accuracy

LOAD_SNIPPET = """\
```python
import open_clip

model = open_clip.create_model("local-dir:{folder}")  # config + weights of this folder
tokenizer = open_clip.get_tokenizer("local-dir:{folder}")  # CLIP BPE, context {context}
preprocess = open_clip.image_transform(
    model.visual.image_size, is_train=False, mean=model.visual.image_mean, std=model.visual.image_std
)
# or, by hand:
import json

cfg = json.load(open("{folder}/open_clip_config.json"))["model_cfg"]
model = open_clip.CLIP(**cfg)
open_clip.load_checkpoint(model, "{folder}/open_clip_model.safetensors")
```"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """Every logged (step, training loss) of the run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], round(r["train/loss"], 4)) for r in records if "train/loss" in r]


def export_clip(config, run_dir: Path, target: Path, command: str) -> Path:
    """Writes ``target``: fp16 weights, the open_clip config, ``training.json`` and ``README.md``."""
    source = run_dir / "model"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / CONFIG_FILE, target / CONFIG_FILE)
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(source / WEIGHTS_FILE).items()}
    atomic_write(target / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    clip = load_folder(target)  # what a user gets
    scores = {
        "single template": zero_shot_accuracy(clip, "test", TEMPLATES[:1], seed=config.data.seed),
        f"{len(TEMPLATES)} templates": zero_shot_accuracy(clip, "test", TEMPLATES, seed=config.data.seed),
    }
    wall = json.loads((run_dir / "wall_minutes.json").read_text())
    trained = json.loads((source / "training.json").read_text())
    record = {
        "command": command,
        "config": json.loads(json.dumps(_plain(config))),
        "images": trained["images"],
        "classes": trained["classes"],
        "held_out_subjects": list(HELD_OUT_SUBJECTS),
        "held_out_pairs": [pair_name(*p) for p in HELD_OUT_PAIRS],
        "templates": list(TEMPLATES),
        "steps": trained["steps"],
        "wall_minutes": round(wall["minutes"], 1),
        "threads": wall["threads"],
        "losses": losses(run_dir),
        "zero_shot_val": trained["zero_shot_val"],
        "zero_shot_test": scores,
        "sha256": sha256(target / WEIGHTS_FILE),
    }
    (target / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (target / "README.md").write_text(card(config, record, target, clip))
    return target


def _plain(config):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(config, resolve=True)


def card(config, record: dict, target: Path, clip) -> str:
    """The model card: what the model is, its data and held-out classes, recipe, zero-shot numbers, how to load."""
    m, o = config.model, config.optim
    params = sum(p.numel() for p in clip.parameters())
    size = (target / WEIGHTS_FILE).stat().st_size / 2**20
    chance = {"subjects": 100 / len(class_names("subjects")), "circles": 100 / len(class_names("circles"))}
    rows = []
    for label, scores in record["zero_shot_test"].items():
        rows.append(
            f"| {label} | {scores['subjects/held_in']:.1f} | {scores['subjects/held_out']:.1f} | "
            f"{scores['circles/held_in']:.1f} | {scores['circles/held_out']:.1f} |"
        )
    first, last = record["losses"][0], record["losses"][-1]
    return f"""# {target.name}

A tiny CLIP pretrained by visionpeft, contrastively, on real 32 px images that ship inside scikit-learn and
scikit-image, so that zero-shot CLIP, prompt learning (CoOp, CoCoOp, KgCoOp, MaPLe, ...) and CLIP adapters run end to
end offline. It is an ordinary open_clip folder: open_clip loads it alone, visionpeft takes it as
`model.name={target}` (`model.library=open_clip`).

- **Architecture**: open_clip `CLIP`, {params:,} parameters: ViT {m.image_size} px, patch {m.patch_size}, width
  {m.vision_width}, {m.vision_layers} blocks; text transformer width {m.text_width}, {m.text_layers} blocks,
  {m.text_heads} heads, context {m.context_length}, the CLIP BPE tokenizer (49,408 tokens); joint embedding
  {m.embed_dim}; fixed temperature {m.temperature} (`logit_scale` = log(1/{m.temperature})).
- **Data** (`visionpeft/demo/clip_mix.py`): the train split, {record["images"]} images of {record["classes"]} classes:
  21 subjects of the captioned mix (scikit-learn digits "handwritten digit three", scikit-image texture crops
  "gravel texture", LFW faces, photo crops "cat") and fill50k-style circles named by colour pair ("red circle on a
  blue background", 40 pairs); captions are the class name in one of {len(TEMPLATES)} templates ("a photo of a {{}}.",
  "a blurry photo of a {{}}.", ...), drawn at every step. Validation and test images were never seen.
- **Held out of pretraining**: the subjects {", ".join(HELD_OUT_SUBJECTS)} (their words never appear in a caption)
  and {len(HELD_OUT_PAIRS)} colour pairs (each colour twice as a fill and twice as a background among them: every word
  seen, never together).
- **Recipe**: class-level contrastive loss (an image's positives: every caption of its class in the batch, UniCL),
  {o.name}, lr {o.lr}, weight decay {o.weight_decay}, {record["steps"]} steps ({o.warmup_steps} warmup, {o.schedule}),
  batch {config.data.batch_size}, seed {config.train.seed}; training loss {first[1]:.2f} (step {first[0]}) ->
  {last[1]:.2f} (step {last[0]}).
- **Training time**: {record["wall_minutes"]:.1f} minutes on this machine's shared CPU ({record["threads"]} threads).
- **Command**: `{record["command"]}`

Zero-shot top-1 (%) on the test split (this folder as shipped, fp16 weights), each subset classified among all its
classes: subjects 23-way (chance {chance["subjects"]:.1f}), circles 56-way (chance {chance["circles"]:.1f}).

| prompts | subjects, held-in | subjects, held-out | circles, seen pairs | circles, held-out pairs |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}

Loading it with open_clip alone:

{LOAD_SNIPPET.format(folder=target, context=m.context_length)}

- **Files**: `{WEIGHTS_FILE}` (fp16, {size:.1f} MiB, sha256 `{record["sha256"]}`), `{CONFIG_FILE}` (`model_cfg`,
  `preprocess_cfg`: OpenAI's image statistics, bicubic), `training.json` (config, data, held-out classes, every
  logged loss, zero-shot numbers). Re-made with `{record["command"]}`.

What it is: a small, honest stand-in for a web-pretrained CLIP whose zero-shot, few-shot and base-to-new questions
can be asked in minutes on a CPU. What it is not: a general image-text model - it knows {record["classes"]} class
names at 32 px; held-out subjects whose words it never read are near chance zero-shot (few-shot learning has to
teach them), while held-out colour pairs are composed from words it did read.
"""
