"""The representative dataset int8 calibration runs on: real data where the source has it."""

from __future__ import annotations

import numpy as np

from tfaccel.errors import StepError


def representative_batches(source, samples: int = 64, batch_size: int = 8,
                           inputs: dict[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
    """Equal-shaped batches of real inputs for int8 calibration.

    Takes ``inputs`` if given, else the source's calibration data (``--calibration-data``), else its
    eval split (real data, e.g. BBC News articles), else its sample inputs. Every batch has the same shape (TF-TRT calibration requires it), so a
    trailing partial batch is dropped unless it would be the only one.

    Args:
        source: a :class:`tfaccel.sources.ModelSource`.
        samples: at most this many examples.
        batch_size: examples per batch.
        inputs: your own calibration inputs (name -> array, first dimension = examples).

    Raises:
        StepError: the data is empty or its inputs have different numbers of examples.

    Example:
        >>> from tfaccel import load_source
        >>> [b["token_ids"].shape for b in representative_batches(load_source("bert-tiny"), 8, 4)]  # doctest: +SKIP
        [(4, 32), (4, 32)]
    """
    if inputs is None:
        inputs = getattr(source, "calibration_inputs", None)  # the user's calibration file (--calibration-data)
    data = inputs if inputs is not None else (source.eval_inputs if source.eval_inputs is not None else source.sample_inputs)
    data = source.check_inputs(dict(data), "calibration inputs")
    counts = {k: len(v) for k, v in data.items()}
    if len(set(counts.values())) != 1 or not next(iter(counts.values()), 0):
        raise StepError(f"Calibration inputs must be non-empty with one example count for every input; got {counts}.")
    n = min(next(iter(counts.values())), samples)
    size = min(batch_size, n)
    stops = list(range(size, n + 1, size))
    return [{k: np.ascontiguousarray(v[stop - size:stop]) for k, v in data.items()} for stop in stops]


def describe_batches(batches: list[dict[str, np.ndarray]], source, inputs=None) -> str:
    """One line for the report: how many batches, their shape, where they came from.

    Example:
        >>> describe_batches(batches, source)  # doctest: +SKIP
        '8 batches of shape (8, 128) from the source's eval split (...)'
    """
    user_file = inputs is None and getattr(source, "calibration_inputs", None) is not None
    what = (f"your calibration data {getattr(source, 'data_files', {}).get('calibration', '')}".rstrip() if user_file
            else "your calibration inputs" if inputs is not None
            else "the source's eval split (accuracy is then measured on data the scales were calibrated on; pass "
                 "calibration_inputs= with training data for an unbiased number)" if source.eval_inputs is not None
            else "the source's sample inputs")
    shape = next(iter(batches[0].values())).shape if batches else ()
    return f"{len(batches)} batches of shape {tuple(shape)} from {what}"
