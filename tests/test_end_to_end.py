"""One real end-to-end run on a slice of Fashion-MNIST (the acceptance command, shortened)."""
import json
from pathlib import Path

import pytest

from cli.main import main

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_snip_lenet300_on_a_slice_of_real_fashion_mnist_learns(tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["train", "--model", "lenet300", "--data", "fashion-mnist", "--method", "snip", "--density", "0.05",
                 "--epochs", "1", "--subset", "20000", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_compressible_params"] == round(0.05 * 266_200)
    assert summary["test_acc"] > 0.65  # chance is 0.10; one epoch on 20k real images
