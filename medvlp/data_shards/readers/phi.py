"""Protected health information: salted hashes of patient / study identifiers and sample keys.

    salt = read_salt("site.salt")                 # >= 16 bytes, kept secret and out of the shards
    hash_rows(rows, salt)                         # patient_id, key and identifier columns -> salted hashes

A hash is the first 16 hex digits of sha256(salt || 0x1f || kind || 0x1f || value): the same id maps to the same
hash across builds with the same salt (so patient-level splits and joins still work) and cannot be reversed by
hashing candidate ids without the salt. Keys keep their data-set prefix (`mimic/` + hash). DICOM header values
never need hashing: only the allow-list in `medvlp.data_shards.readers.dicom.META_ALLOW` reaches a sample.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

MIN_SALT_BYTES = 16
# Extra manifest columns that hold identifiers: hashed like patient_id when ids are hashed.
ID_COLUMNS = ("subject_id", "study_id", "series_id", "dicom_id", "accession", "accession_number", "mrn",
              "study_uid", "series_uid", "sop_uid", "uid", "patient", "patient_name", "image_id")


class SaltError(ValueError):
    user_facing = True


def read_salt(path: str | Path) -> bytes:
    p = Path(path)
    try:
        salt = p.read_bytes().strip()
    except OSError as e:
        raise SaltError(f"--salt-file {p}: cannot read ({e.strerror})") from None
    if len(salt) < MIN_SALT_BYTES:
        raise SaltError(f"--salt-file {p}: {len(salt)} bytes; use at least {MIN_SALT_BYTES} random bytes "
                        "(e.g. `openssl rand -hex 32 > site.salt`)")
    return salt


def hash_id(value: str, salt: bytes, kind: str = "id") -> str:
    h = hashlib.sha256(salt + b"\x1f" + kind.encode() + b"\x1f" + str(value).encode("utf-8"))
    return h.hexdigest()[:16]


def hash_rows(rows: list, salt: bytes) -> None:
    """Replace identifiers of manifest rows in place: patient_id, key (data-set prefix kept), ID_COLUMNS in meta."""
    for r in rows:
        r.patient_id = hash_id(r.patient_id, salt, "patient")
        prefix = f"{r.dataset}/" if r.dataset and r.key.startswith(f"{r.dataset}/") else ""
        r.key = prefix + hash_id(r.key, salt, "key")
        for col in list(r.meta):
            if str(col).lower() in ID_COLUMNS:
                r.meta[col] = hash_id(r.meta[col], salt, str(col).lower())
