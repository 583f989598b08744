"""What the scripts share: options, datasets, feature cache, index files, faiss, results."""

__version__ = "0.1.0"
