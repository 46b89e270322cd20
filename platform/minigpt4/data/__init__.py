"""Image-text data for both training stages and captioning: sources, processing, the Ray Data pipeline.

Names are imported on first use: `minigpt4.data.io` (and the synthetic writer that uses it) stays
quick to import, and only the pipeline needs Ray Data.
"""
from .io import S3Options

_WHERE = {
    "sources": ("FORMATS", "RawSample", "SampleError", "SourceConfig", "expand_braces", "iter_units"),
    "process": ("ProcessConfig", "Processor", "clean_caption"),
    "pipeline": ("DataConfig", "DataReport", "Mixture", "PositionTracker", "TrainingCollator", "build_dataset",
                 "list_epochs", "position_board", "read_errors", "summarize"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = ["S3Options", *_MODULE]


def __getattr__(name: str):
    if name in _MODULE:
        import importlib

        return getattr(importlib.import_module(f".{_MODULE[name]}", __name__), name)
    raise AttributeError(f"module 'minigpt4.data' has no attribute {name!r}")
