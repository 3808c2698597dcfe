import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the datasets: $EMOSCOPE_DATA where set (a GPU machine, where ../shared does not travel), else ../shared/data
SHARED = Path(os.environ.get("EMOSCOPE_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED


@pytest.fixture(scope="session")
def tiny_llama():
    from tiny import tiny_model
    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_llama):
    from tiny import save_tiny
    return save_tiny(tiny_llama, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A small generic CSV dataset with every Ekman label, plenty of rows per class per split."""
    import csv
    d = tmp_path_factory.mktemp("toy")
    words = {"anger": "furious", "disgust": "gross", "fear": "scared", "joy": "happy", "sadness": "sad",
             "surprise": "wow"}
    with open(d / "toy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(240):
            lab = list(words)[i % 6]
            w.writerow([f"r{i}", f"I feel {words[lab]} about thing {i}", lab])
    return d / "toy.csv"


@pytest.fixture(scope="session")
def parallel_bench(tmp_path_factory, tiny_dir, toy_data, shared_data) -> Path:
    """`bench/parallel.py` once, on test_distributed's pipeline config of the tiny model, its work folder kept:
    A = one process (2 threads), B = A's SAEs and the example-parallel stages rerun by 2 torchrun ranks, C = the
    saes stage trained by 2 DDP ranks, D = B's stages in one process with one thread; figures.json its output.
    Its smoke test and test_distributed's checks read the same runs: 4 pipeline runs instead of 8."""
    import subprocess

    from test_distributed import _config

    work = tmp_path_factory.mktemp("parallel")
    cfg = _config(work, tiny_dir, toy_data, "config")
    bench = Path(__file__).parents[1] / "bench" / "parallel.py"
    r = subprocess.run([sys.executable, str(bench), "--config", str(cfg), "--out", str(work), "--json",
                        str(work / "figures.json")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return work
