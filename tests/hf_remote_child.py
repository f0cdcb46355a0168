"""Run as a script by tests/test_export_hf_remote.py in a fresh interpreter where d2v2_scale (and
this test package) cannot be imported: only torch + transformers + the exported folders' own code.

argv: jobs.pt out.pt workdir.  jobs: {"load_only": {name: (folder, kwargs)}} (AutoModel outputs only) or
{"image": folder, "audio": folder, "batches": {...},
"digits": (uint8 [N, 32, 32, 3], labels [N]), "speech": ([N, S] float, [str] transcripts)}.
For each folder: AutoModel outputs (every hidden state), each head's Trainer steps, save_pretrained,
the pipeline on the saved folder, a wrong head's refusal."""

import importlib
import importlib.abc
import json
import sys


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("d2v2_scale", "data_prep", "tests"):
            raise ImportError(f"{name}: blocked in the fresh HF process")


sys.meta_path.insert(0, _Blocked())

import torch  # noqa: E402
from transformers import (AutoFeatureExtractor, AutoImageProcessor, AutoModel,  # noqa: E402
                          AutoModelForAudioClassification, AutoModelForCTC, AutoModelForImageClassification,
                          Trainer, TrainingArguments, Wav2Vec2CTCTokenizer, Wav2Vec2Processor, pipeline)


def args(out, steps=3):
    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)


def main():
    jobs, out, work = torch.load(sys.argv[1]), sys.argv[2], sys.argv[3]
    res = {}
    try:
        importlib.import_module("d2v2_scale")
        res["d2v2_importable"] = True
    except ImportError:
        res["d2v2_importable"] = False
    if "load_only" in jobs:  # {name: (folder, model kwargs)} -> AutoModel outputs only
        for name, (folder, batch) in jobs["load_only"].items():
            m, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
            with torch.no_grad():
                o = m.eval()(**batch, output_hidden_states=True)
            res[name] = {"cls": type(m).__name__, "last": o.last_hidden_state, "missing": sorted(info["missing_keys"]),
                         "unexpected": sorted(info["unexpected_keys"])}
        torch.save(res, out)
        return
    for name in ("image", "audio"):
        m, info = AutoModel.from_pretrained(jobs[name], trust_remote_code=True, output_loading_info=True)
        with torch.no_grad():
            o = m.eval()(**jobs["batches"][name], output_hidden_states=True)
        res[name] = {"cls": type(m).__name__, "last": o.last_hidden_state, "hidden": list(o.hidden_states),
                     "pooled": o.pooler_output, "missing": sorted(info["missing_keys"]),
                     "unexpected": sorted(info["unexpected_keys"]), "code": type(m).__module__}
    # a head that does not fit the encoder: one line naming it
    for auto, folder in ((AutoModelForCTC, "image"), (AutoModelForImageClassification, "audio")):
        try:
            auto.from_pretrained(jobs[folder], trust_remote_code=True)
            res[f"refused-{folder}"] = None
        except ValueError as e:
            res[f"refused-{folder}"] = str(e)

    # image classification: a few Trainer steps, save, pipeline on the saved folder
    imgs, labels = jobs["digits"]
    from PIL import Image

    pil = [Image.fromarray(a.numpy()) for a in imgs]
    proc = AutoImageProcessor.from_pretrained(jobs["image"])
    pv = proc(images=pil, return_tensors="pt")["pixel_values"]
    ds = [{"pixel_values": pv[i], "labels": int(labels[i])} for i in range(len(pil))]
    id2label = {i: f"digit{i}" for i in range(10)}
    m = AutoModelForImageClassification.from_pretrained(jobs["image"], trust_remote_code=True, num_labels=10,
                                                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    before = m.classifier.weight.detach().clone()
    tr = Trainer(model=m, args=args(f"{work}/img-run"), train_dataset=ds)
    tr.train()
    res["img_trained"] = not torch.equal(before, m.classifier.weight.detach())
    tr.save_model(f"{work}/img-ft")
    proc.save_pretrained(f"{work}/img-ft")
    m.eval()
    with torch.no_grad():
        want = m(pixel_values=pv[:2]).logits
    again = AutoModelForImageClassification.from_pretrained(f"{work}/img-ft", trust_remote_code=True).eval()
    with torch.no_grad():
        res["img_roundtrip"] = (again(pixel_values=pv[:2]).logits - want).abs().max().item()
    p = pipeline("image-classification", model=f"{work}/img-ft", trust_remote_code=True, device="cpu")
    res["img_pipeline"] = p(pil[0], top_k=3)
    res["img_ft_files"] = sorted(json.load(open(f"{work}/img-ft/config.json"))["auto_map"])

    # speech: CTC with a letter vocabulary, then the ASR pipeline on the saved folder
    waves, texts = jobs["speech"]
    letters = sorted({c for t in texts for c in t.replace(" ", "|")})
    vocab = {"<pad>": 0, "<unk>": 1} | {c: i + 2 for i, c in enumerate(letters)}
    json.dump(vocab, open(f"{work}/vocab.json", "w"))
    tok = Wav2Vec2CTCTokenizer(f"{work}/vocab.json", unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    fe = AutoFeatureExtractor.from_pretrained(jobs["audio"])
    processor = Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok)
    ds = [{"wav": waves[i].numpy(), "text": texts[i]} for i in range(len(texts))]

    def collate(rows):
        b = fe([r["wav"] for r in rows], sampling_rate=fe.sampling_rate, padding=True, return_tensors="pt")
        lab = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        b["labels"] = lab["input_ids"].masked_fill(lab["attention_mask"].eq(0), -100)
        return dict(b)

    m = AutoModelForCTC.from_pretrained(jobs["audio"], trust_remote_code=True, vocab_size=len(vocab),
                                        pad_token_id=tok.pad_token_id, mask_time_prob=0.3, mask_time_length=2)
    m.freeze_feature_encoder()
    res["ctc_frozen"] = all(not p.requires_grad for p in m.data2vec2.encoder.local.cnn.parameters())
    cnn0 = m.data2vec2.encoder.local.cnn.convs[0].weight.detach().clone()
    blk0 = m.data2vec2.encoder.blocks[0].attn.qkv.weight.detach().clone()
    tr = Trainer(model=m, args=args(f"{work}/ctc-run"), train_dataset=ds, data_collator=collate)
    tr.train()
    res["ctc_trained"] = (torch.equal(cnn0, m.data2vec2.encoder.local.cnn.convs[0].weight)
                          and not torch.equal(blk0, m.data2vec2.encoder.blocks[0].attn.qkv.weight))
    tr.save_model(f"{work}/ctc-ft")
    processor.save_pretrained(f"{work}/ctc-ft")
    asr = pipeline("automatic-speech-recognition", model=f"{work}/ctc-ft", trust_remote_code=True, device="cpu")
    res["asr_pipeline"] = asr({"raw": waves[0].numpy(), "sampling_rate": fe.sampling_rate})

    # speech classification: a few steps
    m = AutoModelForAudioClassification.from_pretrained(jobs["audio"], trust_remote_code=True, num_labels=3)
    cds = [{"input_values": waves[i][:8000], "labels": i % 3} for i in range(len(texts))]
    tr = Trainer(model=m, args=args(f"{work}/cls-run", steps=2), train_dataset=cds)
    res["cls_loss"] = tr.train().training_loss
    torch.save(res, out)


if __name__ == "__main__":
    main()
