import json

import pytest
import torch

from cla_train import ceilings


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_cuda_it_refuses_with_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        ceilings.main([])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rates_are_positive_and_written_as_json(tmp_path):
    out = tmp_path / "c.json"
    assert ceilings.main(["--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["copy_bytes_per_s"] > 0
    assert all(v > 0 for v in data["bf16_matmul_flops"].values())
