"""A few integration tests on the real embedded models (GGUF -> dequantised cache -> view)."""

import numpy as np
import pytest

from emoscope.data import load_split, select
from emoscope.task import Task
from emoscope.models import load_model
from emoscope.task.score import score_ids, score_naive

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,layers,d,chat",
                         [("smollm2-135m-instruct", 30, 576, True), ("gemma3-270m", 18, 640, False)])
def test_embedded_model_scores_like_naive(name, layers, d, chat, shared_data):
    view = load_model(name, device="cpu", dtype="float32")
    assert (view.n_layers, view.d_model, view.chat) == (layers, d, chat)
    task = Task(view, per_class=1, shots=2)
    rows, rep = load_split("goemotions_ekman", "test", shared_data)
    ex = select(rows, task.classes, rep, per_class=1, seed=0)[:3]
    prompts = task.encode_all(e.text for e in ex)
    labels = task.label_ids
    np.testing.assert_allclose(score_ids(view, prompts, labels), score_naive(view, prompts, labels), atol=2e-3)
