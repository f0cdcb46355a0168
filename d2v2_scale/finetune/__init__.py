"""`d2v2-finetune`: fine-tune an exported transformers folder (d2v2-export --format hf) on a
d2v2-prep corpus with transformers.Trainer, with the reference's fine-tuning recipes
(docs/FINETUNE.md).  recipes.py: hyper-parameters, layer-wise LR decay, tri-stage schedule, CER;
cli.py: the command."""
