"""The typed config a run reads, as a package.

  common.py      ConfigError, MODALITIES, AUDIO_CONV_LAYERS
  model.py       the `model` section, written as one dataclass per concern (encoder, front ends,
                 targets, decoder, loss, objective, data2vec 1.0, BEiT, data2vec-aqc)
  schema.py      the other sections and `RunConfig`
  presets/       the named presets as YAML files (presets.py reads them)
  merge.py       dicts -> typed sections: key checks and type coercion
  loading.py     preset -> YAML file -> command-line overrides
  validation.py  the up-front checks (`validate`, `match_reference_batch`)

Everything is re-exported here: `from d2v2_scale.config import RunConfig, build_config, ...`.
"""

from .common import AUDIO_CONV_LAYERS, MODALITIES, ConfigError
from .loading import apply_overrides, build_config, load_preset, load_yaml, set_path
from .model import (MODEL_SECTIONS, AqcSection, AudioSection, BeitSection, Data2vec1Section, DecoderSection,
                    EncoderSection, ImageSection, LossSection, ModelConfig, ObjectiveSection, TargetSection,
                    TextSection)
from .presets import PRESETS, preset_names
from .schema import (CheckpointConfig, DataConfig, EmaConfig, GuardConfig, LoggingConfig, MaskConfig,
                     OptimConfig, ParallelConfig, RunConfig)
from .validation import D2V1_VARIANTS, _beit_errors, match_reference_batch, validate

__all__ = ["AUDIO_CONV_LAYERS", "MODALITIES", "MODEL_SECTIONS", "PRESETS", "D2V1_VARIANTS", "AqcSection",
           "AudioSection", "BeitSection", "CheckpointConfig", "ConfigError", "Data2vec1Section", "DataConfig",
           "DecoderSection", "EmaConfig", "EncoderSection", "GuardConfig", "ImageSection", "LoggingConfig",
           "LossSection", "MaskConfig", "ModelConfig", "ObjectiveSection", "OptimConfig", "ParallelConfig",
           "RunConfig", "TargetSection", "TextSection", "apply_overrides", "build_config", "load_preset",
           "load_yaml", "match_reference_batch", "preset_names", "set_path", "validate",
           "_beit_errors"]  # tests check the BEiT field messages directly
