"""Data: captions files -> image-level splits -> batches, and the images themselves.

Owns one reader per captions format behind `readers.read_captions`, the corpus and its splits
(`corpus`), the vocabulary, the dataset, batches and loader (`dataset`), safe image opening from
paths, URLs and bytes (`images`), the synthetic Shapes set and the data check (`check`).
Imports only `config` and `files`: the bottom layer.
"""
