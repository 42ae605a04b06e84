"""The floor every technique stands on. Modules here import only :mod:`tfaccel.errors`,
:mod:`tfaccel.compat` and third-party libraries, never a technique, the registry, the pipeline or
``--auto`` (``tests/test_layering.py`` checks it):

- :mod:`tfaccel.core.step`: the Step contract (kinds, ``bind``, ``check``, ``apply``) and StepContext.
- :mod:`tfaccel.core.artifact`: Artifact, the registry of artifact kinds and their runners.
- :mod:`tfaccel.core.source`: ModelSource (and what an example brings: tokenizer, training split).
- :mod:`tfaccel.core.eval_data`: the user's data files (eval, calibration, fine-tuning).
- :mod:`tfaccel.core.validation`: tolerances, output comparison, accuracy.
- :mod:`tfaccel.core.timer`: THE timer (round-robin, warm-up, settle calls, budget, early stop).
- :mod:`tfaccel.core.measure`: Measurement, peak memory, shapes.
- :mod:`tfaccel.core.chain`: building a chain of steps with shared prefixes and deadlines.
- :mod:`tfaccel.core.files`: atomic files and staged output folders.
- :mod:`tfaccel.core.report`: report.json / report.md.
"""
