"""launch/gpu_check.sh's script on the CPU at toy sizes (--device cpu --quick): every code path it takes on a
GPU machine (synthetic data, the throughput runs, DCC/mAP comparisons, torchrun 1 vs 2 processes) runs and
passes here, so the one prepared GPU check does not rot between GPU sessions; and every trainer command of
the full-size check passes the trainer's --check-only (--plan-only), so its sizes cannot hide behind --quick."""
import os
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
                  "bf16 vs fp32 mAP (small-cnn)", "torchrun 1 vs 2 cpu processes: equal codes",
                  "train efficientnet-lite0 32 px pretrained, fine-tuned",
                  "train efficientnet-lite0 32 px pretrained, frozen trunk"):
        assert any(line.startswith(check) and "  ok  " in line for line in table.splitlines()), (check, table)
    # device-vs-CPU rows compare the CPU with itself here: they ran, but must not claim "ok"
    for check in ("CUDA tests", "DCC n=2,000", "mAP@5000"):
        assert any(line.startswith(check) and "  n/a  " in line for line in table.splitlines()), (check, table)


def test_every_trainer_command_of_the_full_size_check_passes_check_only(tmp_path):
    """`bash launch/gpu_check.sh --device cpu --plan-only`: every trainer command of the full-size GPU check
    (AlexNet throughput, bf16 vs fp32, 1 vs 2 processes, host syncs) passes the trainer's --check-only on
    the check's own synthetic data, so a sizing error (e.g. --num-samples above stage 1's database) fails
    here instead of on the GPU machine. The launcher's set-up is pointed at this interpreter: a venv folder
    whose python runs it, stamped as installed from this checkout."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "DIHN_VENV": str(venv), "DIHN_SKIP_APT": "1"}
    stamp = subprocess.run(["bash", "-c", "source launch/common.sh && install_stamp"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    (venv / ".dihn_dist_install").write_text(stamp + "\n")
    result = subprocess.run(["bash", "launch/gpu_check.sh", "--device", "cpu", "--plan-only", "--workdir",
                             str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("\n\n")[-1]
    plans = [line for line in table.splitlines() if line.startswith("plan: ")]
    for check in ("train alexnet 224 px, fp32", "train alexnet 224 px, bf16 + channels-last + compile",
                  "train efficientnet-lite0 224 px pretrained, frozen trunk",
                  "small-cnn bf16", "small-cnn fp32 x2 (2 processes)", "host syncs, 8 steps"):
        assert any(line.startswith(f"plan: {check}") and "  ok  " in line for line in plans), (check, table)
    assert not (tmp_path / "work" / "runs").exists(), "--check-only wrote a run folder"
