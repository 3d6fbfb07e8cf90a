"""The patho corpus's target domain ("lab2"): same tissue and classes, a different lab look."""
import numpy as np
import pytest

from medvlp.data_shards.schema import encode_sample
from medvlp.data_shards.synth import synth_samples, synth_to_shards


def test_lab2_keeps_classes_and_changes_the_look():
    he = list(synth_samples("patho", 12, seed=3, size=32))
    lab2 = list(synth_samples("patho", 12, seed=3, size=32, domain="lab2"))
    assert [s.key for s in he] == [s.key for s in lab2]
    assert [s.labels for s in he] == [s.labels for s in lab2]
    assert [s.meta["class"] for s in he] == [s.meta["class"] for s in lab2]
    assert all(s.meta["domain"] == "lab2" and "domain" not in h.meta for h, s in zip(he, lab2))
    # bright-field pink H&E (bright, red above blue) vs a dark field with bright nuclei
    mean_he = np.mean([s.image.reshape(-1, 3).mean(0) for s in he], 0)
    mean_l2 = np.mean([s.image.reshape(-1, 3).mean(0) for s in lab2], 0)
    assert mean_he[0] > mean_he[2] and mean_he.mean() > 150 and mean_l2.mean() < 100
    assert not np.array_equal(he[0].image, lab2[0].image)


def test_default_domain_is_unchanged():
    a = [encode_sample(s) for s in synth_samples("patho", 4, seed=1, size=32)]
    b = [encode_sample(s) for s in synth_samples("patho", 4, seed=1, size=32, domain="he")]
    assert a == b


def test_bad_domain_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="patho domain 'lab3' is not one of he, lab2"):
        list(synth_samples("patho", 1, size=32, domain="lab3"))
    with pytest.raises(ValueError, match="domain applies to patho only"):
        list(synth_samples("cxr", 1, size=48, domain="lab2"))
    doc = synth_to_shards(tmp_path, modality="patho", n=3, size=32, domain="lab2")
    assert doc["domain"] == "lab2" and "--domain lab2" in doc["command"]
