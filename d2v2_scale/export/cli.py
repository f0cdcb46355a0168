"""`d2v2-export`: a training checkpoint -> one plain-PyTorch encoder (safetensors + config.json)."""

from __future__ import annotations

import argparse
import sys

from .consolidate import export_checkpoint, ExportError
from .hf import export_hf

USAGE = """d2v2-export CHECKPOINT_OR_RUN_DIR --out DIR [--which teacher|student] [--with-decoder] [--force]
       d2v2-export CHECKPOINT_OR_RUN_DIR_OR_EXPORT --out DIR --format hf [--which teacher|student] [--force]
                   [--gpt2-bpe DIR_WITH_encoder.json_AND_vocab.bpe]

examples:
  d2v2-export runs/vitb --out exports/vitb-teacher            # newest complete checkpoint, EMA teacher
  d2v2-export runs/vitb/checkpoints/step_00100000 --out exports/vitb-s --which student --with-decoder
  d2v2-export runs/text --out hf/text --format hf            # AutoModel.from_pretrained("hf/text")
  d2v2-export exports/nlp-base --out hf/nlp-base --format hf --gpt2-bpe gpt2_bpe/  # + AutoTokenizer
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="d2v2-export", usage=USAGE,
                                description="Export a d2v2 checkpoint of any system it trains (data2vec 2.0, "
                                            "data2vec 1.0, data2vec-aqc) to the plain-PyTorch twin (twins/encoder.py) "
                                            "or a Hugging Face folder")
    p.add_argument("checkpoint", help="a checkpoint folder (…/checkpoints/step_XXXXXXXX) or a run's output dir "
                                      "(the newest COMPLETE checkpoint is taken)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--which", choices=["teacher", "student"], default=None,
                   help="the EMA teacher (default of the plain export) or the student encoder (default of "
                        "--format hf: what the reference fine-tunes, docs/FINETUNE.md; from a plain export "
                        "folder: what the folder holds)")
    p.add_argument("--with-decoder", action="store_true",
                   help="also store the student's decoder tensors (as decoder.*) in the same file")
    p.add_argument("--force", action="store_true", help="replace an existing export")
    p.add_argument("--format", choices=["plain", "hf"], default="plain",
                   help="plain (default): safetensors + config.json for twins/encoder.py; hf: a Hugging Face "
                        "transformers folder (pip install -e '.[hf]'), for the models a transformers class "
                        "computes exactly (docs/EXPORT.md); the input may also be a plain export folder")
    p.add_argument("--gpt2-bpe", metavar="DIR", default=None,
                   help="--format hf of an imported fairseq text model (d2v2-import --dict): a folder with "
                        "fairseq's GPT-2 BPE encoder.json and vocab.bpe; the HF folder then gets a tokenizer that "
                        "gives the dictionary's ids (docs/EXPORT.md)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def warn(msg: str) -> None:
        print(f"d2v2-export: warning: {msg}", file=sys.stderr)

    if args.format == "hf":

        if args.with_decoder:
            print("d2v2-export: error: --with-decoder has no place in a transformers model (--format hf)",
                  file=sys.stderr)
            return 2
        try:
            hcfg = export_hf(args.checkpoint, args.out, which=args.which, force=args.force, gpt2_bpe=args.gpt2_bpe,
                             warn=warn)
        except ExportError as e:
            print(f"d2v2-export: error: {e}", file=sys.stderr)
            return 2
        print(f"exported the {hcfg['d2v2_export'].get('which')} of {args.checkpoint} as "
              f"{hcfg['architectures'][0]} to {args.out} (AutoModel.from_pretrained)")
        return 0
    if args.gpt2_bpe:
        print("d2v2-export: error: --gpt2-bpe goes with --format hf (the plain export keeps dict.txt as it is)",
              file=sys.stderr)
        return 2
    try:
        cfg = export_checkpoint(args.checkpoint, args.out, which=args.which or "teacher", with_decoder=args.with_decoder,
                                force=args.force, warn=warn)
    except ExportError as e:
        print(f"d2v2-export: error: {e}", file=sys.stderr)
        return 2
    prov = cfg["d2v2_export"]
    extra = f"; from the student: {len(prov['from_student'])} tensors" if prov["from_student"] else ""
    print(f"exported the {prov['which']} of {prov['checkpoint']} (step {prov['step']}, {prov['modality']}, "
          f"zero {prov['zero_stage']}, tp {prov['tp']} x dp {prov['dp']}) to {args.out}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
