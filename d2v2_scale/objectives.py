"""What each objective (model.variant) is, as data: one frozen record per objective.

The code of an objective lives in model/objectives/ (its forward, teacher and losses); what the
rest of the project needs to know about it (which masks it draws per modality, whether its
student gathers the kept tokens, which teacher parts it copies, the FLOP terms of its step, its
Hugging Face classes, the fairseq format it imports from) is this record, read by the loader,
model/flops.py, export/hf.py, export/fairseq/ and the model builders instead of comparing
variant names.  Plain Python, no torch: the lowest layer of the package may read it.

docs/DATA2VEC1.md and docs/AQC.md describe the data2vec 1.0 and data2vec-aqc objectives.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType


def _frozen(d: dict) -> MappingProxyType:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str  # the model.variant value
    title: str  # for messages: "data2vec 2.0"
    # modality -> the masking.generator values it draws (the first is its presets'); a modality
    # absent here is one the objective does not train
    masks: MappingProxyType
    # the student encodes only the kept tokens (data2vec 2.0: M clones, exact-count masks, the
    # batch carries `kept`, data/layout.py); else every position, masked ones replaced by a
    # mask embedding (data2vec 1.0 family: M = 1)
    gathers_kept: bool
    # built on data2vec 1.0 (mask embedding, M = 1, regression head instead of the conv decoder)
    builds_on_data2vec1: bool
    # modality -> teacher parameter-name prefixes the EMA copies from the student at every step
    # instead of averaging (fairseq `skip_keys`; 1.0 speech: the positional conv).  Text's copied
    # parts (token and position embeddings, embedding LayerNorm) are not teacher parameters at
    # all: the teacher reads the student's current embeddings, which is copying them every step.
    teacher_copied: MappingProxyType
    # FLOP terms (model/flops.py): the prediction head ("decoder": the conv decoder over all T
    # positions; "regression": a linear head on the masked positions only) and how many views
    # the CNN front end encodes in the student step (data2vec-aqc: the clean and augmented one)
    flops_head: str
    student_local_views: int
    # modality -> the exact transformers class of its exported encoder (export/hf.py); absent:
    # none exists
    hf_classes: MappingProxyType
    # fairseq cfg.model._name values an imported checkpoint of this objective carries, and the
    # `format` an imported run's metadata records (export/fairseq/)
    fairseq_models: tuple[str, ...]
    import_format: str | None
    # the prefix of its preset names (data2vec 1.0: "d2v1-image-base")
    preset_prefix: str

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.masks)

    def copied_prefixes(self, modality: str) -> tuple[str, ...]:
        return self.teacher_copied.get(modality, ())


DATA2VEC2 = Objective(
    name="data2vec2", title="data2vec 2.0",
    masks=_frozen({"image": ("data2vec2",), "audio": ("data2vec2",), "text": ("data2vec2",)}),
    gathers_kept=True, builds_on_data2vec1=False, teacher_copied=_frozen({}),
    flops_head="decoder", student_local_views=1,
    hf_classes=_frozen({"text": "RobertaModel"}),
    fairseq_models=(None, "data2vec_multi"), import_format="fairseq-data2vec2", preset_prefix="",
)

DATA2VEC1 = Objective(
    name="data2vec1", title="data2vec 1.0",
    masks=_frozen({"audio": ("speech_spans",), "text": ("text_spans", "bert"), "image": ("blockwise",)}),
    gathers_kept=False, builds_on_data2vec1=True,
    teacher_copied=_frozen({"audio": ("encoder.positions.",)}),
    flops_head="regression", student_local_views=1,
    hf_classes=_frozen({"text": "Data2VecTextModel", "audio": "Data2VecAudioModel",
                        "image": "Data2VecVisionModel"}),
    fairseq_models=("data2vec_audio", "data2vec_text"), import_format="fairseq-data2vec1", preset_prefix="d2v1-",
)

DATA2VEC_AQC = Objective(
    name="data2vec_aqc", title="data2vec-aqc",
    masks=_frozen({"audio": ("speech_spans",)}),
    gathers_kept=False, builds_on_data2vec1=True,
    teacher_copied=_frozen({"audio": ("encoder.positions.",)}),
    flops_head="regression", student_local_views=2,
    hf_classes=_frozen({"audio": "Data2VecAudioModel"}),
    fairseq_models=(), import_format=None, preset_prefix="aqc-",
)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DATA2VEC2, DATA2VEC1, DATA2VEC_AQC)}


def objective_of(mcfg) -> Objective:
    """The record of model.variant (a ModelConfig, or an export's config dict)."""
    name = mcfg.get("variant", "data2vec2") if isinstance(mcfg, dict) else mcfg.variant
    if name not in OBJECTIVES:
        raise ValueError(f"model.variant={name!r}: known {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def uses_beit(mcfg) -> bool:
    """Image models built from the BEiT-style encoder (data2vec 1.0 vision, model.image_block=beit)
    rather than the 2.0 ViT: their own teacher, twin, head init and FLOP count."""
    get = mcfg.get if isinstance(mcfg, dict) else (lambda k, d=None: getattr(mcfg, k, d))
    return get("modality") == "image" and get("image_block", "vit2") == "beit"
