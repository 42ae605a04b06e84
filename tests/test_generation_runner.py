"""The generation runner (tfaccel.generation, `tfaccel generate`): one greedy contract for the
generate SavedModel, the ONNX decoder and the TensorRT decoder; past lengths beyond the prompt bucket,
stop tokens, and clear errors for bad prompts and paths."""

import json

import numpy as np
import pytest
from conftest import run_cli
from test_onnx_decoder import decoders

from tfaccel.errors import InputMismatchError, SourceError
from tfaccel.generation import artifact_kind, generate, load_generator, prepare_prompts
from tfaccel.xla.generate_export import keras_hub_greedy, write_generate_saved_model

BUCKETS = (8, 16)
CAP = 24


@pytest.fixture(scope="module")
def artifacts(gpt2_tiny, tmp_path_factory):
    """The gpt2-tiny generate SavedModel (prompt buckets 8 and 16, graph mode) and its fp32 ONNX decoder."""
    sm = tmp_path_factory.mktemp("gen") / "saved_model"
    write_generate_saved_model(gpt2_tiny.model, sm, max_new_tokens_cap=CAP, prompt_buckets=BUCKETS, jit_compile=False)
    return {"saved_model": sm, **decoders("gpt2", gpt2_tiny.model, tmp_path_factory)}


def test_artifact_kinds_are_recognised(artifacts, tmp_path):
    assert artifact_kind(artifacts["saved_model"]) == "saved_model"
    assert artifact_kind(artifacts["fp32"]) == "onnx_decoder"
    assert artifact_kind(artifacts["fp32"] / "decoder.onnx") == "onnx_decoder"
    with pytest.raises(SourceError, match="not a tfaccel generation artifact"):
        artifact_kind(tmp_path)
    with pytest.raises(SourceError, match="does not exist"):
        load_generator(tmp_path / "missing")


def test_past_grows_beyond_the_prompt_bucket(gpt2_tiny, artifacts):
    """A 12-token prompt (bucket 16) + 24 new tokens: the cache grows to 36 positions, past the bucket."""
    prompts = np.array([[3 + i for i in range(12)], [40, 41, 42, 43, 44, 0, 0, 0, 0, 0, 0, 0]], "int32")
    mask = (prompts > 0).astype("int32")
    want = keras_hub_greedy(gpt2_tiny.model, prompts, mask, CAP)
    for kind in ("saved_model", "fp32"):
        got = generate(artifacts[kind], prompts, CAP, padding_mask=mask)
        np.testing.assert_array_equal(got.token_ids, want, err_msg=kind)
        assert got.lengths.tolist() == [12 + CAP, 5 + CAP]


def test_ragged_list_prompts_give_each_row_its_own_continuation(gpt2_tiny, artifacts):
    rows = [[7, 8, 9, 10, 11], [12, 13]]
    gen = load_generator(artifacts["fp32"])
    both = gen.generate(rows, 6)
    for i, row in enumerate(rows):
        alone = gen.generate([row], 6)
        assert both.new_tokens([5, 2])[i] == alone.new_tokens([len(row)])[0]


def test_stop_token_ends_a_row_the_same_way_in_every_artifact(artifacts):
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    free = generate(artifacts["fp32"], prompts, 10)
    stop = int(free.token_ids[0, 4 + 2])  # the 3rd new token of row 0
    results = {k: generate(artifacts[k], prompts, 10, stop_token_id=stop) for k in ("saved_model", "fp32")}
    for kind, res in results.items():
        first = int(np.argmax(free.token_ids[0, 4:] == stop))
        assert res.lengths[0] == 4 + first + 1, kind  # the row ends right after the stop token
        assert res.token_ids[0, 4 + first] == stop and not res.token_ids[0, 4 + first + 1:].any(), kind
    np.testing.assert_array_equal(results["saved_model"].token_ids, results["fp32"].token_ids)
    np.testing.assert_array_equal(results["saved_model"].lengths, results["fp32"].lengths)


def test_onnx_thread_settings_give_the_same_tokens_and_bad_ones_are_named(artifacts):
    """One thread with spinning and the default (all cores, no spinning) decode the same tokens."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    default = load_generator(artifacts["int8"])
    one = load_generator(artifacts["int8"], intra_op_threads=1, spinning=True)
    assert default.threading == {"intra_op_threads": 0, "spinning": False}
    np.testing.assert_array_equal(one.generate(prompts, 8).token_ids, default.generate(prompts, 8).token_ids)
    with pytest.raises(InputMismatchError, match="intra_op_threads=-1"):
        load_generator(artifacts["fp32"], intra_op_threads=-1)
    with pytest.raises(InputMismatchError, match="spinning='yes'"):
        load_generator(artifacts["fp32"], spinning="yes")


def test_bad_prompts_get_clear_errors(artifacts):
    gen = load_generator(artifacts["fp32"])  # gpt2-tiny: 300 ids, 64 positions
    with pytest.raises(InputMismatchError, match=r"60 \+ 8 = 68|68 > the model's maximum length 64"):
        gen.generate([list(range(1, 61))], 8)
    with pytest.raises(InputMismatchError, match="integer token ids. Received dtype float32"):
        gen.generate(np.ones((1, 4), "float32"), 4)
    with pytest.raises(InputMismatchError, match="must be integers"):
        gen.generate([[1, 2.5, 3]], 4)
    with pytest.raises(InputMismatchError, match="Token id 300 is outside"):
        gen.generate([[1, 300]], 4)
    with pytest.raises(InputMismatchError, match="at least one token"):
        gen.generate([[]], 4)
    with pytest.raises(InputMismatchError, match="max_new_tokens"):
        gen.generate([[1, 2]], -1)
    sm = load_generator(artifacts["saved_model"])
    with pytest.raises(InputMismatchError, match="largest prompt bucket"):
        sm.generate([list(range(1, 21))], 4)  # 20 tokens > bucket 16
    with pytest.raises(InputMismatchError, match=f"at most {CAP} new tokens"):
        sm.generate([[1, 2, 3]], CAP + 4)


def test_prepare_prompts_checks_the_mask():
    ids, mask = prepare_prompts(np.array([[4, 5, 0]]), np.array([[1, 1, 0]]))
    assert ids.dtype == np.int32 and mask.tolist() == [[1, 1, 0]]
    with pytest.raises(InputMismatchError, match="right-padded"):
        prepare_prompts(np.array([[4, 5, 6]]), np.array([[0, 1, 1]]))


def test_cli_generate_in_a_fresh_process(gpt2_tiny, artifacts):
    want = keras_hub_greedy(gpt2_tiny.model, np.array([[1, 2, 3]], "int32"), np.ones((1, 3), "int32"), 5)
    r = run_cli("generate", str(artifacts["fp32"]), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["artifact"] == "onnx_decoder" and out["new_token_ids"] == [want[0, 3:].tolist()]
    bad = run_cli("generate", str(artifacts["fp32"]), "--prompt-ids", "1,two,3")
    assert bad.returncode == 2 and "'two' is not an integer token id" in bad.stderr
    long = run_cli("generate", str(artifacts["fp32"]), "--prompt-ids", ",".join(["1"] * 62), "--max-new-tokens", "4")
    assert long.returncode == 2 and "maximum length 64" in long.stderr
    one = run_cli("generate", str(artifacts["fp32"]), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                  "--threads", "1", "--spin", "--json")
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout.strip().splitlines()[-1])["new_token_ids"] == [want[0, 3:].tolist()]
    bad_threads = run_cli("generate", str(artifacts["fp32"]), "--prompt-ids", "1,2,3", "--threads", "-2")
    assert bad_threads.returncode == 2 and "--threads must be at least 0" in bad_threads.stderr, bad_threads.stderr
    not_onnx = run_cli("generate", str(artifacts["saved_model"]), "--prompt-ids", "1,2,3", "--threads", "1")
    assert not_onnx.returncode == 2 and "--threads applies only to ONNX decoders" in not_onnx.stderr, not_onnx.stderr


@pytest.mark.gpu
def test_tensorrt_decoder_follows_keras_hub(gpt2_tiny, artifacts, tmp_path):
    """fp16 engine from the same ONNX decoder, profiles over batch and past length (GPU + `trt` extra)."""
    from tfaccel.generation.agreement import decoder_agreement
    from tfaccel.generation.tensorrt_decoder import build_decoder_engine

    build_decoder_engine(artifacts["fp32"], tmp_path / "trt", precision="fp16", max_batch=4, max_prompt=16,
                         max_length=64)
    gen = load_generator(tmp_path / "trt")
    assert gen.kind == "tensorrt_decoder"
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], "int32")
    res = decoder_agreement(gpt2_tiny.model, gen, prompts, (prompts > 0).astype("int32"), 20)
    assert res["next_token_agreement"] >= 0.9 and res["next_token_cosine_min"] >= 0.999, res
