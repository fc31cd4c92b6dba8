"""Open a real dataset: a Hugging Face dataset name (streamed), a directory written by `datasets.save_to_disk`, or
local .parquet / .jsonl / .csv / .txt files (memory-mapped); check that its text field exists and holds text."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Local data files by name ending -> the datasets builder that reads them.
BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".txt": "text",
    ".txt.gz": "text",
    ".md": "text",
}


@dataclass(frozen=True, kw_only=True)
class DocumentSource:
    """Where the documents come from."""

    dataset: str
    """A Hugging Face dataset name (streamed), a directory written by `datasets.save_to_disk`, a directory of data
    files, or local .parquet / .jsonl / .json / .csv / .txt files (a glob pattern is allowed)."""
    dataset_config: str | None = None
    """The dataset's configuration (subset), e.g. 'en' for allenai/c4; 'name:config' in `dataset` also works."""
    split: str = "train"
    """The split to train on."""
    text_field: str = "text"
    """The column holding the text of a document."""
    eval_split: str | None = None
    """A split to take the held-out documents from (e.g. 'validation'). Default: a fixed slice of the training
    split (its last documents for local data, its first for a streamed dataset), never trained on."""
    streaming: bool | None = None
    """Stream instead of memory-mapping. Default: stream hub datasets, memory-map local data (which datasets
    converts once into its cache unless it is a save_to_disk directory)."""

    @classmethod
    def from_config(cls, config: Any) -> DocumentSource:
        """From a DataConfig. (Fields DataConfig does not declare keep their defaults.)"""
        name, dataset_config = config.dataset, getattr(config, "dataset_config", None)
        if dataset_config is None and ":" in name and not Path(name).exists():
            name, dataset_config = name.split(":", 1)
        return cls(
            dataset=name,
            dataset_config=dataset_config,
            split=getattr(config, "split", "train"),
            text_field=getattr(config, "text_field", "text"),
            eval_split=getattr(config, "eval_split", None),
        )


def _local_builder(name: str) -> str | None:
    lowered = name.lower()
    for ending in sorted(BUILDERS, key=len, reverse=True):
        if lowered.endswith(ending):
            return BUILDERS[ending]
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or _local_builder(name) is not None or "*" in name


def load_split(source: DocumentSource, split: str):
    """The `split` of the source as a datasets.Dataset (memory-mapped) or IterableDataset (streamed)."""
    import datasets  # lazy: importing datasets takes a second and only real data needs it

    datasets.disable_progress_bars()
    name = source.dataset
    path = Path(name).expanduser()
    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"dataset {name} has no split {split!r}; its splits are: {', '.join(loaded)}"
                )
            loaded = loaded[split]
        elif split != "train":
            raise ValueError(
                f"dataset {name} is a single saved split, so only split 'train' exists, not {split!r}"
            )
        return (
            loaded.to_iterable_dataset(num_shards=min(len(loaded), 64) or 1) if source.streaming else loaded
        )
    if path.exists() or "*" in name:
        files = sorted(glob.glob(str(path))) if "*" in name else [str(path)]
        if not files:
            raise ValueError(f"dataset {name}: no file matches")
        streaming = bool(source.streaming)
        try:
            if path.is_dir():
                return datasets.load_dataset(str(path), split=split, streaming=streaming)
            builder = _local_builder(files[0])
            if builder is None:
                raise ValueError(
                    f"dataset {name}: unknown file type; use {', '.join(sorted(BUILDERS))} files, "
                    "a directory of them, or a save_to_disk directory"
                )
            if split != "train":
                raise ValueError(f"dataset {name}: local files have only the split 'train', not {split!r}")
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(builder, data_files=files, split=split, streaming=streaming, **extra)
        except ValueError as e:
            if str(e).startswith(f"dataset {name}"):
                raise
            raise ValueError(f"cannot read dataset {name}: {e}") from None
    if _looks_local(name):
        raise ValueError(f"dataset {name}: no such file or directory")
    try:
        return datasets.load_dataset(
            name, source.dataset_config, split=split, streaming=source.streaming is not False
        )
    except Exception as e:  # datasets raises many types for an unknown, private or unreachable dataset
        what = f"{name}" + (f" (config {source.dataset_config})" if source.dataset_config else "")
        raise ValueError(f"cannot load dataset {what}, split {split!r}: {type(e).__name__}: {e}") from None


def check_text_field(dataset, source: DocumentSource) -> None:
    """A clear error naming the available columns when --text-field is not a text column."""
    features = dataset.features
    if features is None:  # a streamed dataset that does not declare its columns: look at the first document
        first = next(iter(dataset.take(1)), None)
        if first is None:
            raise ValueError(f"dataset {source.dataset} split {source.split!r} is empty")
        columns = {key: type(value).__name__ for key, value in first.items()}
        kind = columns.get(source.text_field)
        is_text = kind == "str"
    else:
        columns = {key: str(getattr(value, "dtype", type(value).__name__)) for key, value in features.items()}
        kind = columns.get(source.text_field)
        is_text = kind in ("string", "large_string")
    if kind is None:
        raise ValueError(
            f"--text-field {source.text_field!r} is not a column of dataset {source.dataset}; "
            f"its columns are: {', '.join(columns)}"
        )
    if not is_text:
        raise ValueError(
            f"--text-field {source.text_field!r} of dataset {source.dataset} holds {kind}, not text; "
            f"its columns are: {', '.join(f'{k} ({v})' for k, v in columns.items())}"
        )


def is_indexed(dataset) -> bool:
    """A memory-mapped datasets.Dataset (random access, known length), not a streamed IterableDataset."""
    import datasets

    return isinstance(dataset, datasets.Dataset)
