"""Importers of public data-set layouts into medvlp shards: `import_dataset(kind, src, out_dir, **opts)`.

kinds: medmnist (.npz), chexpert (CheXpert / MIMIC-CXR label CSV + images), iuxray (reports + projections CSVs +
images), pcam (PatchCamelyon HDF5), mimic_cxr (MIMIC-CXR DICOM tree + reports), ct_reports (NIfTI volumes + reports
CSV, organ masks from segmentations/ folders), covid_chestxray (metadata.csv + images/, clinical notes), medpix
(MedPix 2.0 Descriptions.json + Case_topic.json + images/), roco (ROCO radiology folders: captions + images/),
class_folders (one folder of tiles per tissue class: NCT-CRC-HE-100K / Kather), camelyon17 (Camelyon17-WILDS
patches + metadata.csv, split by hospital), nih_cxr14 (NIH ChestX-ray14 labels, boxes and images*/ folders).
Options arrive as Python values or as the CLI's `KEY=VALUE` strings; each
importer converts them to their types and rejects unknown ones by name.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any

IMPORTERS = {"medmnist": ("medvlp.data_shards.importers.medmnist", "import_medmnist"),
             "chexpert": ("medvlp.data_shards.importers.chexpert", "import_chexpert"),
             "iuxray": ("medvlp.data_shards.importers.iuxray", "import_iuxray"),
             "pcam": ("medvlp.data_shards.importers.pcam", "import_pcam"),
             "mimic_cxr": ("medvlp.data_shards.importers.mimic_cxr", "import_mimic_cxr"),
             "ct_reports": ("medvlp.data_shards.importers.ct_reports", "import_ct_reports"),
             "covid_chestxray": ("medvlp.data_shards.importers.covid_chestxray", "import_covid_chestxray"),
             "medpix": ("medvlp.data_shards.importers.medpix", "import_medpix"),
             "roco": ("medvlp.data_shards.importers.roco", "import_roco"),
             "class_folders": ("medvlp.data_shards.importers.class_folders", "import_class_folders"),
             "camelyon17": ("medvlp.data_shards.importers.camelyon17", "import_camelyon17"),
             "nih_cxr14": ("medvlp.data_shards.importers.nih_cxr14", "import_nih_cxr14")}


def import_dataset(kind: str, src: str | Path, out_dir: str | Path, **opts: Any) -> dict:
    """Import a public data set layout at `src` into shards + index.json under `out_dir`; returns the index."""
    if kind not in IMPORTERS:
        raise ValueError(f"import kind {kind!r} is not one of {sorted(IMPORTERS)}")
    module, fn = IMPORTERS[kind]
    return getattr(import_module(module), fn)(src, out_dir, **opts)


__all__ = ["import_dataset", "IMPORTERS"]
