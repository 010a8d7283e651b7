"""launch/gpu_check.sh's script on the CPU at toy sizes (--device cpu --quick): every code path it takes on a
GPU machine (synthetic data, the throughput runs, DCC/mAP comparisons, torchrun 1 vs 2 processes) runs and
passes here, so the one prepared GPU check does not rot between GPU sessions."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_at_toy_sizes(tmp_path):
    result = subprocess.run([sys.executable, "tests/bench/gpu_check.py", "--device", "cpu", "--quick",
                             "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("\n\n")[-1]
    for check in ("train small-cnn 32 px, fp32", "train small-cnn 32 px, bf16 + channels-last",
                  "DCC n=2,000", "mAP@5000", "torchrun 1 vs 2 cpu processes: equal codes",
                  "train efficientnet-lite0 32 px pretrained, fine-tuned",
                  "train efficientnet-lite0 32 px pretrained, frozen trunk"):
        assert any(line.startswith(check) and "  ok  " in line for line in table.splitlines()), (check, table)
