"""d2v2-finetune's held-out split and labelled budget (finetune/rows.split, --train-rows)."""

import numpy as np
import pytest

from d2v2_scale.finetune.rows import FinetuneError, split


def test_train_rows_is_a_fixed_stratified_subset_of_the_training_split():
    labels = np.repeat(np.arange(10), 40)                      # 400 rows, 10 labels
    paths = [f"/spk{i % 8}_/{i}.wav" for i in range(len(labels))]  # speakers 0-7; 6 and 7 held out
    tr_all, te_all = split(labels, paths, "/spk[67]_", 0.5)
    tr, te = split(labels, paths, "/spk[67]_", 0.5, train_rows=50)
    assert np.array_equal(te, te_all)                         # the held-out rows do not move
    assert len(tr) == 50 and set(tr) <= set(tr_all)
    assert np.bincount(labels[tr], minlength=10).tolist() == [5] * 10  # stratified
    assert np.array_equal(split(labels, paths, "/spk[67]_", 0.5, train_rows=50)[0], tr)  # same rows every call
    tr_f, te_f = split(labels, paths, None, 0.25, train_rows=20)  # also after a stratified fraction split
    assert len(tr_f) == 20 and np.array_equal(te_f, split(labels, paths, None, 0.25)[1])
    assert np.array_equal(split(labels, paths, "/spk[67]_", 0.5, train_rows=len(tr_all))[0], tr_all)
    for bad in (5, 0, len(tr_all) + 1):                        # fewer rows than labels, none, more than there are
        with pytest.raises(FinetuneError, match=f"--train-rows {bad}: the training split has {len(tr_all)} rows "
                                                f"of 10 labels; ask for 10 to {len(tr_all)}"):
            split(labels, paths, "/spk[67]_", 0.5, train_rows=bad)


def test_train_rows_is_refused_for_text(capsys):
    from d2v2_scale.finetune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["text", "folder", "--data", "x.csv", "--out", "o", "--train-rows", "10"])
    assert e.value.code == 2 and "--train-rows is for image and ctc" in capsys.readouterr().err
