import json

import numpy as np
import pytest

from pagedserve.model.loader import ModelNotFoundError, _unpermute, resolve_model_path
from pagedserve.model.registry import model_class_for


def _permute(w, n_head):  # what llama.cpp's converter does
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    assert np.array_equal(_unpermute(_permute(w, 4), 4), w)


def test_missing_model_errors_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "weird.bin").write_text("x")
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model_path(str(tmp_path / "weird.bin"))


def test_unknown_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        model_class_for("GPT2LMHeadModel")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    from pagedserve import LLM

    with pytest.raises((ValueError, KeyError)):
        LLM(str(tmp_path))


def test_default_model_resolves_inside_the_wheel():
    path = resolve_model_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
