"""The model card (README.md) written into every `--format hf` folder: what the folder holds, where
it comes from, how to load and fine-tune it, and what it is not (docs/EXPORT.md, docs/FINETUNE.md).
Names no local path: the corpus by its manifest folder's name, the checkpoint run-relative."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEMS = {"data2vec2": "data2vec 2.0", "data2vec1": "data2vec 1.0", "data2vec_aqc": "data2vec-aqc"}
MODALITY = {"image": "image", "audio": "speech", "text": "text"}
LOAD = {
    "Data2Vec2Model": ("from transformers import AutoModel\n"
                       "model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)  # the folder's own code\n"),
    # transformers builds Data2VecVisionModel without its pooler unless asked; pooler_output = the CLS token
    "Data2VecVisionModel": ("from transformers import AutoModel\n"
                            "model = AutoModel.from_pretrained(FOLDER, add_pooling_layer=True)  # pooler_output: CLS\n"
                            "# pipeline('image-feature-extraction', model=FOLDER, "
                            "model_kwargs={'add_pooling_layer': True})(img, pool=True)\n"),
}
HEADS = {"image": "AutoModelForImageClassification", "audio": "AutoModelForCTC / AutoModelForAudioClassification",
         "text": "AutoModelForSequenceClassification"}


def corpus_name(run_config: dict | None) -> str:
    """The pretraining corpus as '<manifest folder> (<rows> rows)', or 'unknown' (no manifest on this machine)."""
    man = Path(str(((run_config or {}).get("data") or {}).get("manifest") or ""))
    if not man.is_file():
        return "unknown (the checkpoint's manifest is not on the exporting machine)"
    try:
        rows = json.loads(man.read_text()).get("num_rows")
    except (OSError, ValueError):
        rows = None
    return f"{man.parent.name}" + (f" ({rows} rows)" if rows else "")


def model_card(hcfg: dict, cfg: dict, corpus: str | None = None) -> str:
    """README.md text for an HF folder: hcfg = the config.json written, cfg = the export's model config."""
    prov = hcfg.get("d2v2_export") or {}
    cls = hcfg["architectures"][0]
    system = SYSTEMS.get(cfg.get("variant", "data2vec2"), cfg.get("variant"))
    mod = MODALITY[cfg["modality"]]
    remote = cls == "Data2Vec2Model"
    load = LOAD.get(cls, f"from transformers import AutoModel\nmodel = AutoModel.from_pretrained(FOLDER)  # {cls}\n")
    which = prov.get("which", "unknown")
    lines = [
        "---", "library_name: transformers", f"tags: [{system.replace(' ', '-')}, {mod}, self-supervised]", "---", "",
        f"# {system} {mod} encoder ({prov.get('preset') or 'custom'})", "",
        f"A {system} {mod} encoder pretrained with d2v2-scale and exported by `d2v2-export --format hf`.", "",
        "| | |", "|---|---|",
        f"| system | {system} ({mod}) |",
        f"| preset | {prov.get('preset') or 'unknown'} |",
        f"| updates | {prov.get('step', 'unknown')} |",
        f"| corpus | {corpus or 'unknown'} |",
        f"| weights | the {which}" + (" (the EMA teacher)" if which == "teacher" else "") + " |",
        f"| source | {prov.get('source', 'd2v2-scale')} checkpoint `{prov.get('checkpoint', 'unknown')}` |",
        f"| size | {cfg['depth']} blocks, width {cfg['embed_dim']}, {cfg['num_heads']} heads |",
        f"| transformers class | `{cls}`" + (" (code shipped in this folder: `trust_remote_code=True`)" if remote else "")
        + " |", "",
        "## Load", "", "```python", load.replace("FOLDER", '"path/to/this/folder"') + "```", "",
        "## Fine-tune", "",
        f"Task heads: `{HEADS[cfg['modality']]}`"
        + (" (with `trust_remote_code=True`)" if remote else "") + ", trained with `transformers.Trainer`; "
        "the reference's fine-tuning recipes and hyper-parameters are in d2v2-scale's docs/FINETUNE.md.",
        "The reference (fairseq) fine-tunes data2vec 2.0 from the *student* weights (its EMA teacher is dropped "
        "when the fine-tuning model loads the checkpoint); this folder holds the " + which + ": "
        "`d2v2-export RUN --format hf --which " + ("student" if which == "teacher" else "teacher") + "` gives the other.",
    ]
    if remote:
        lines += ["", "The regularizers of the reference fine-tuning are config fields (`drop_path_rate`, `layerdrop`, "
                  "`hidden_dropout`, `attention_dropout`, `activation_dropout`, `final_dropout`; speech: "
                  "`mask_time_prob`/`mask_time_length` with the learned `masked_spec_embed`, "
                  "`mask_feature_prob`/`mask_feature_length`), preset to the reference's values; override them in "
                  "`from_pretrained(..., drop_path_rate=...)`."]
    lines += ["", "## What it is not", "",
              "- Not fine-tuned: no task head is trained; the encoder's outputs are features.",
              "- Not a checkpoint of the original fairseq release unless the source above says fairseq; "
              "pretrained on the corpus named above only.",
              "- Not for generation: an encoder (no decoder, no language-model head)." if mod == "text" else
              "- The pretraining decoder and the teacher's targets are not included.", ""]
    return "\n".join(lines)
