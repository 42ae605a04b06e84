"""The family x step matrix (issue #13): every keras-hub text family, tiny random config
(``tiny:<family>``, tfaccel/examples/families.py), through each pipeline step on its own.

A cell passes when the pipeline validates the stage with the step's own tolerances, or when it is an
expected refusal listed in EXPECTED_REFUSALS (a PlanError/StepError whose message matches the
reason). Any other error, an unexpected refusal, or a listed refusal that now works fails the cell.

CI runs every family through export and every CausalLM through generate (shared with
tests/test_generate.py, which checks those SavedModels token for token); the other steps run on
CI_SUBSET: BERT (MiniLM's architecture), DeBERTa-v3 (relative positions), Llama (grouped KV heads,
rotary), Gemma3 (per-layer cache, sliding window, soft-capping) and Falcon (ALiBi); int8, whose
XLA-compiled serving function takes the longest to build, on BERT and Llama only. That keeps the
matrix near 4 minutes on 2 quiet cores.
TFACCEL_FULL_MATRIX=1 runs every cell; tools/family_matrix.py runs every cell and prints the README table.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from family_matrix import DECODERS, FAMILIES, STEPS, cells, outcome, run_step

# (family, step) -> the reason, a regex of the refusal's message. One table; the README quotes it.
# LiteRT (TensorFlow 2.21's converter, builtin ops only): the decoders that build their attention mask
# with a new-axis strided slice of an int/bool tensor (rotary/ALiBi families) need the Flex delegate.
_LITERT_STRIDED_SLICE = r"StepError: The LiteRT converter .* cannot convert .*LiteRT has no kernel for: StridedSlice"
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    **{(f, "litert-dynamic"): _LITERT_STRIDED_SLICE
       for f in ("llama", "llama3", "mistral", "gemma", "gemma3", "qwen", "qwen3", "phi3", "falcon", "smollm3")},
}

ALL_FAMILIES_IN_CI = ("export", "generate")
CI_SUBSET = ("bert", "deberta_v3", "llama", "gemma3", "falcon")
CI_FAMILIES = {"int8": ("bert", "llama")}
FULL = os.environ.get("TFACCEL_FULL_MATRIX") == "1"


def ci_cells():
    return [(f, s) for f, s in cells(FAMILIES, STEPS)
            if FULL or s in ALL_FAMILIES_IN_CI or f in CI_FAMILIES.get(s, CI_SUBSET)]


def check_cell(family: str, step: str) -> None:
    """Assert the cell's outcome is the one the table expects."""
    status, reason = outcome(run_step(family, step))
    expected = EXPECTED_REFUSALS.get((family, step))
    if expected is None:
        assert status == "ok", f"{family} x {step} was refused, not listed in EXPECTED_REFUSALS: {reason}"
    else:
        assert status == "refused", f"{family} x {step} now works: drop it from EXPECTED_REFUSALS"
        assert re.search(expected, reason), f"{family} x {step} refused for another reason: {reason}"


@pytest.mark.parametrize(("family", "step"), ci_cells(), ids=[f"{f}-{s}" for f, s in ci_cells()])
def test_family_step(family, step):
    check_cell(family, step)


def test_the_refusal_table_names_real_cells():
    for family, step in EXPECTED_REFUSALS:
        assert family in FAMILIES and step in STEPS and (step != "generate" or family in DECODERS)


def test_every_tiny_family_loads_with_varied_prompt_lengths():
    from family_matrix import source

    for family in FAMILIES:
        src = source(family)
        lengths = src.sample_inputs["padding_mask"].sum(1)
        assert src.name == f"tiny:{family}" and len(set(lengths.tolist())) > 1
        assert src.task == ("causal_lm" if family in DECODERS else "backbone" if family == "electra"
                            else "classification")
        assert np.all(src.sample_inputs["token_ids"][src.sample_inputs["padding_mask"] == 0] == 0)
