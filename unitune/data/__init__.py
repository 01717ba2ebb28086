"""Data: rows -> samples -> token examples -> batches (see build.py for the pipeline)."""
from unitune.data.build import Batches, DataBundle, build_data
from unitune.data.files import DataError

__all__ = ["Batches", "DataBundle", "DataError", "build_data"]
