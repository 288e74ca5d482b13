"""tools/gpu_check.py --smoke: the GPU-day script runs end to end on the CPU at tiny shapes (the
kernel in Triton's interpreter, the CUDA tests collected), so it cannot rot between GPU days."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402


def test_smoke_runs_every_check(capsys):
    rows = gpu_check.main(["--smoke"])
    assert [r["check"].split(" ")[0] for r in rows] == ["CUDA", "kernel", "one"]
    assert all(r["ok"] for r in rows), rows  # the kernel agrees with the torch path (fp32, 1e-4)
    assert "| kernel vs torch path, fwd+bwd |" in capsys.readouterr().out
