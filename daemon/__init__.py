"""codeformer-daemon: watches a folder of scans and restores the faces in them through the CodeFormer API."""

__version__ = "0.1.0"
