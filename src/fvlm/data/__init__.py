"""Data: CT-RATE files (:mod:`.ctrate`), the processed store (:mod:`.store`), preprocessing (:mod:`.preprocess`),
training/evaluation datasets (:mod:`.dataset`). Submodules are imported explicitly (no heavy imports here)."""
