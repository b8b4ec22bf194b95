"""Data side of training and evaluation: the corpus store (read side), tasks, augmentation."""

from megaseg.data.store import FORMAT_VERSION, Corpus, CorpusError, Protocol, TaskKey, load_protocol

__all__ = ["FORMAT_VERSION", "Corpus", "CorpusError", "Protocol", "TaskKey", "load_protocol"]
