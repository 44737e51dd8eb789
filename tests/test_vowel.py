"""The vowel task: readers on the real files, the speaker split, standardisation, and learning."""

from __future__ import annotations

import numpy as np
import pytest

from moecli.errors import ConfigError
from tasks.vowel import (
    Vowel,
    read_hillenbrand,
    read_parselmouth,
    read_peterson_barney,
    read_vowels,
    speaker_split,
)
from tests.conftest import train_inprocess


def test_peterson_barney_reader_on_the_shared_file(shared_data):
    t = read_peterson_barney(shared_data / "vowels" / "peterson_barney1952.data")
    assert len(t.vowel) == 1520 and len(set(t.speaker)) == 76
    assert sorted(set(t.vowel)) == sorted(["IY", "IH", "EH", "AE", "AH", "AA", "AO", "UH", "UW", "ER"])
    assert (~t.unanimous).sum() == 321 and not np.isnan(t.formants).any()
    assert t.formants[:, 1].min() == 190 and t.formants[:, 2].max() == 3610


def test_hillenbrand_reader_maps_codes_and_marks_missing(shared_data):
    t = read_hillenbrand(shared_data / "vowels" / "hillenbrand1995_vowdata.dat")
    assert len(t.vowel) == 1668 and len(set(t.speaker)) == 139
    assert np.isnan(t.formants[:, 2]).sum() == 10  # F2 zeros at steady state
    assert {"AA", "AH", "EY", "OW"} <= set(t.vowel)
    assert read_vowels(str(shared_data / "vowels" / "hillenbrand1995_vowdata.dat")).vowel.tolist() == t.vowel.tolist()


def test_parselmouth_copy_equals_the_shared_file(shared_data):
    a = read_parselmouth()
    b = read_peterson_barney(shared_data / "vowels" / "peterson_barney1952.data")
    assert a.vowel.tolist() == b.vowel.tolist() and a.speaker.tolist() == b.speaker.tolist()
    np.testing.assert_array_equal(a.formants, b.formants)


def test_speaker_split_keeps_speakers_whole_and_is_seeded():
    speakers = np.repeat(np.arange(76).astype(str), 8)
    train, test = speaker_split(speakers, 0, 50, None, 0, 0)
    assert not set(speakers[train]) & set(speakers[test])
    assert len(set(speakers[train])) == 50 and len(set(speakers[test])) == 26
    assert (train | test).all()
    again, _ = speaker_split(speakers, 0, 50, None, 0, 0)
    other, _ = speaker_split(speakers, 1, 50, None, 0, 0)
    assert (again == train).all() and not (other == train).all()
    _, t25 = speaker_split(speakers, 0, 50, 25, 0, 0)
    assert len(set(speakers[t25])) == 25
    folds = [speaker_split(speakers, 0, 50, None, 5, k)[1] for k in range(5)]
    assert (np.sum(folds, axis=0) == 1).all()


def test_four_vowel_default_split_sizes_and_train_only_standardisation():
    task = Vowel()
    task.setup(0)
    (xtr, ytr), (xte, yte) = task.data["train"], task.data["test"]
    assert len(ytr) == 400 and len(yte) == 208
    np.testing.assert_allclose(xtr.mean(0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(xtr.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    assert abs(float(xte.mean())) > 1e-4  # fitted on the training split only


def test_bad_task_options_are_user_errors():
    with pytest.raises(ConfigError, match="task.features"):
        Vowel(features=("F1", "F9"))
    with pytest.raises(ConfigError, match="task.vowels"):
        Vowel(vowels=("IY", "XX")).setup(0)
    with pytest.raises(ConfigError, match="task.data_path"):
        Vowel(data_path="/nonexistent/file").setup(0)


def test_competitive_mixture_learns_the_four_vowels(tmp_path):
    summary = train_inprocess(["task=vowel", "combiner=competitive"], tmp_path)
    assert summary["final"]["test/acc"] >= 0.85
    importance = [summary["final"][f"route/out/importance/e{i}"] for i in range(4)]
    assert sum(importance) == pytest.approx(1.0, abs=1e-5)
