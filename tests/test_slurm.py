"""The Slurm templates: lint, then real jobs on a real one-node Slurm (tests/slurm_cluster.py).

1. `bash -n` on every template and shell file, and every variable a template uses has a default (or is
   assigned before use, or is one Slurm always sets).
2. cpu_smoke.sbatch (2 torchrun processes, gloo, tiny data) completes with its outputs and metrics.
3. Preemption: `scontrol requeue` after the first checkpoint; the second attempt resumes and ends with
   the uninterrupted run's codes.
4. The template's own signal path: SIGUSR1 to the batch shell (what --signal=B:USR1@120 delivers before
   the time limit) stops the training step through torchrun, requeues the job, and the job completes
   with the same codes.

The Slurm tests skip only when Slurm cannot run here (not root, or slurm-wlm cannot be installed), and
say why; anything else that goes wrong is a failure. Under CI=true a Slurm that cannot start is a failure
too.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import SlurmCluster, SlurmUnavailable  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
TEMPLATES = sorted(SLURM_DIR.glob("*.sbatch"))
COMMON = SLURM_DIR / "common.sh"
LAUNCH_HELPERS = [REPO / "launch" / name for name in
                  ("train_local_gpus.sh", "train_debug.sh", "train_cpu.sh", "submit_slurm.sh")]
SMOKE = SLURM_DIR / "cpu_smoke.sbatch"
STAGES = ("original", "incremental")
MAX_ITER = 4  # cpu_smoke.sbatch's default

# ----------------------------------------------------------------------------------------------------
# 1. Lint

# Variables a template may use bare: set by Slurm in every batch job (checked by dihn_require_job) or by bash.
ALWAYS_SET = {"SLURM_JOB_ID", "SECONDS", "BASH_SOURCE", "PWD", "HOME", "PATH", "HOSTNAME"}
REFERENCE = re.compile(r"\$\{(#?)([A-Za-z_][A-Za-z0-9_]*)(\[[^]]*\])?(:?[-=?+]|[^}]*)?|\$([A-Za-z_][A-Za-z0-9_]*)")
ASSIGNMENT = re.compile(
    r"(?:^|[;&|({]\s*|\b(?:local|export|declare|readonly)\s+(?:-\w+\s+)*)([A-Za-z_][A-Za-z0-9_]*)(?:\[[^]]*\])?\+?="
    r"|\bread\s+(?:-\w+\s+)*([A-Za-z_][A-Za-z0-9_]*)"
    r"|\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b"
    r"|\bprintf\s+-v\s+([A-Za-z_][A-Za-z0-9_]*)"
    r"|\blocal\s+((?:[A-Za-z_][A-Za-z0-9_]*\s*)+)$", re.M)
ARITHMETIC = re.compile(r"\$\(\((.*?)\)\)", re.S)


def code_lines(text: str) -> str:
    """The text without comment lines (the #SBATCH header included) and single-quoted strings."""
    kept = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"'[^'\n]*'", "''", "\n".join(kept))


DECLARATION = re.compile(r"^\s*(?:local|declare|export|readonly)\b(.*)$", re.M)


def assignments(text: str) -> dict:
    """Variable -> offset of its first assignment (`local a=1 b c=2` declares a, b and c)."""
    first = {}
    for match in ASSIGNMENT.finditer(text):
        names = [g for g in match.groups() if g]
        for name in " ".join(names).split():
            first[name] = min(first.get(name, match.start()), match.start())
    for match in DECLARATION.finditer(text):
        unquoted = re.sub(r'"[^"]*"', '""', match.group(1))
        for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", unquoted):
            first[name] = min(first.get(name, match.start()), match.start())
    return first


def variables_without_default(path: Path, sourced=()) -> list:
    """References `$VAR`/`${VAR}` to a variable that is neither given a default there (`${VAR:-x}`,
    `${VAR:=x}`, `${VAR:?msg}`, `${VAR:+x}`), nor assigned earlier (in the file, or in a sourced file),
    nor always set. Names used bare inside $(( )) count as references too."""
    text = code_lines(path.read_text())
    known = set(ALWAYS_SET)
    for other in sourced:
        known |= set(assignments(code_lines(other.read_text())))
    assigned = assignments(text)
    problems = []
    for match in REFERENCE.finditer(text):
        name = match.group(2) or match.group(5)
        operator = match.group(4) or ""
        if match.group(1) == "#" or operator[:2] in (":-", ":=", ":?", ":+"):
            continue
        if name in known or assigned.get(name, len(text)) < match.start():
            continue
        line = text.count("\n", 0, match.start()) + 1
        problems.append(f"{path.name}: ${name} (code line {line}) has no default")
    for match in ARITHMETIC.finditer(text):
        for name in re.findall(r"(?<![$\w{])([A-Za-z_][A-Za-z0-9_]*)", match.group(1)):
            if name not in known and assigned.get(name, len(text)) >= match.start():
                problems.append(f"{path.name}: {name} in $(( {match.group(1).strip()} )) has no default")
    return problems


@pytest.mark.parametrize("path", TEMPLATES + [COMMON] + LAUNCH_HELPERS, ids=lambda p: p.name)
def test_shell_files_parse(path):
    assert path.is_file(), f"{path} is missing"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n {path}: {result.stderr}"


def test_the_four_templates_exist():
    names = {p.name for p in TEMPLATES}
    assert {"single_node.sbatch", "multi_node.sbatch", "prepare.sbatch", "cpu_smoke.sbatch"} <= names, names


@pytest.mark.parametrize("path", TEMPLATES + [COMMON], ids=lambda p: p.name)
def test_every_variable_has_a_default(path):
    sourced = [] if path == COMMON else [COMMON]
    assert variables_without_default(path, sourced) == []


def test_the_default_check_catches_a_missing_default(tmp_path):
    script = tmp_path / "bad.sbatch"
    script.write_text('#!/bin/bash\n# ${COMMENTED} is fine\nA="${A:-1}"\necho "$A $DATA ${OUT}" \'$QUOTED\'\n'
                      'local x; x=1; echo "$x ${#A} $(( A + COUNT ))"\n')
    problems = variables_without_default(script)
    assert [p.split()[1] for p in problems] == ["$DATA", "$OUT", "COUNT"], problems


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_templates_are_preemption_safe_and_log_per_job(path):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    def option(name):
        return [line for line in header if re.match(rf"#SBATCH\s+--{name}\b", line)]
    assert option("output") and "%j" in option("output")[0], f"{path.name}: no per-job --output (%j)"
    assert option("open-mode") and "append" in option("open-mode")[0], f"{path.name}: needs --open-mode=append"
    assert option("requeue"), f"{path.name}: needs --requeue"
    assert option("signal") and "B:USR1@" in option("signal")[0], f"{path.name}: needs --signal=B:USR1@..."
    assert re.search(r'^source "\$\{DIHN_REPO:-\$\{SLURM_SUBMIT_DIR:-\.\}\}/slurm/common\.sh"', text, re.M)
    assert "dihn_run_step" in text or "dihn_torchrun" in text, f"{path.name}: runs its step outside the trap"


def test_the_torchrun_step_always_resumes_and_rendezvouses_on_the_head_node():
    text = COMMON.read_text()
    assert "-m dihn_dist.train --resume" in text
    for piece in ("--rdzv_backend c10d", '--rdzv_endpoint "$head:$port"', '--nnodes "$nnodes"',
                  "--ntasks-per-node=1", 'scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n1',
                  'scontrol requeue "${SLURM_JOB_ID}"', "trap dihn_on_usr1 USR1"):
        assert piece in text, piece


# ----------------------------------------------------------------------------------------------------
# 2-4. A real Slurm

def slurm_missing(reason: str) -> None:
    """Skip on a developer's machine; under CI (CI=true, as GitHub Actions sets it) fail, so that the requeue
    promise cannot silently leave the checks."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: the Slurm tests must run in CI, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        slurm_missing("the Slurm tests start munged/slurmctld/slurmd and may install slurm-wlm: they need root")
    try:
        instance = SlurmCluster(cpus=max(2, os.cpu_count() or 2)).start()
    except SlurmUnavailable as error:
        slurm_missing(f"Slurm is not available: {error}")
    yield instance
    instance.stop()


def python_environment() -> dict:
    """VENV for the template: this interpreter's virtual environment, or its PATH as is."""
    if sys.prefix != sys.base_prefix:
        return {"VENV": sys.prefix}
    return {"VENV": "none", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


class Job:
    def __init__(self, cluster: SlurmCluster, data: Path, out: Path, logs: Path):
        self.cluster, self.out = cluster, out
        env = {"DATA": str(data), "OUT": str(out), "DIHN_REPO": str(REPO), **python_environment()}
        self.submitted = time.time()
        self.id = cluster.sbatch("--chdir", str(REPO), f"--output={logs}/%x-%j.out", str(SMOKE), env=env)
        self.log = logs / f"dihn-cpu-smoke-{self.id}.out"

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no log yet)"

    def fail(self, message: str):
        slurmd = self.cluster.root / "log" / "slurmd.log"
        extra = slurmd.read_text()[-1500:] if slurmd.exists() else ""
        pytest.fail(f"job {self.id}: {message}\n--- job log ---\n{self.text()[-4000:]}\n--- slurmd.log ---\n{extra}")

    def wait_done(self, timeout_s: float = 300) -> dict:
        try:
            fields = self.cluster.wait_done(self.id, timeout_s)
        except TimeoutError as error:
            self.fail(str(error))
        if fields.get("JobState") != "COMPLETED" or fields.get("ExitCode") != "0:0":
            self.fail(f"ended {fields.get('JobState')} with exit code {fields.get('ExitCode')}")
        return fields

    def wait_for_checkpoint(self, stage: str = "original", timeout_s: float = 180) -> Path:
        checkpoint = self.out / "checkpoints" / f"{stage}.pt"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if checkpoint.exists():
                return checkpoint
            state = self.cluster.job(self.id).get("JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", None):
                self.fail(f"ended ({state}) before writing {checkpoint}")
            time.sleep(0.05)
        self.fail(f"no checkpoint {checkpoint} after {timeout_s} s")

    def wait_requeued(self, timeout_s: float = 120) -> dict:
        try:
            fields = self.cluster.wait_for(
                self.id, lambda f: f.get("Restarts") == "1" and f.get("JobState") == "PENDING", timeout_s,
                "requeued (PENDING, Restarts=1)", poll_s=0.2)
        except TimeoutError as error:
            self.fail(str(error))
        self.requeued_at = time.time()
        return fields

    def release(self) -> None:
        """Start the requeued job now instead of after Slurm's requeue delay (Reason=BeginTime).

        Not within the second of the requeue: slurmd revokes the job's credential when it kills the
        attempt and compares times in whole seconds, so a relaunch in that same second is refused
        ("Job N already killed, do not launch batch job") and the job ends FAILED."""
        time.sleep(max(0.0, self.requeued_at + 2.0 - time.time()))
        self.cluster.run(["scontrol", "update", f"jobid={self.id}", "StartTime=now"])


def worker_processes(out: Path) -> list:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "dihn_dist.train" in cmdline and str(out) in cmdline:
            found.append(process.pid)
    return found


def codes(out: Path) -> dict:
    return {(stage, part): np.load(out / stage / f"{part}_codes.npy") for stage in STAGES
            for part in ("database", "query")}


def assert_same_codes(run: Path, reference: Path):
    ours, theirs = codes(run), codes(reference)
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), f"{run}: {key[0]}/{key[1]}_codes.npy differ from the uninterrupted run's"


def assert_resumed(job: Job) -> None:
    log = job.text()
    attempts = log.split("attempt 2 (SLURM_RESTART_COUNT=1)")
    if len(attempts) != 2:
        job.fail("the log has no second attempt with SLURM_RESTART_COUNT=1")
    first, second = attempts
    if "attempt 1 (SLURM_RESTART_COUNT=0)" not in first:
        job.fail("--open-mode=append lost the first attempt's output")
    if re.search(rf"stage incremental iteration {MAX_ITER}/{MAX_ITER}", first):
        job.fail("the first attempt finished the last stage: the interruption came too late to test anything")
    resumed = re.findall(r"stage (\w+): resumed after outer iteration (\d+) of \d+", second)
    if not resumed:
        job.fail("the second attempt did not resume from a checkpoint (no 'resumed after outer iteration')")
    stage, iteration = resumed[0]
    if stage == "original":  # it resumed mid-stage: it must not redo the iterations it had done
        if re.search(r"stage original iteration 1/", second):
            job.fail("the second attempt restarted stage original from iteration 1")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_prepared, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm-smoke")
    job = Job(cluster, tiny_prepared, base / "run", base)
    fields = job.wait_done(timeout_s=300)
    job.elapsed_s = time.time() - job.submitted
    job.fields = fields
    return job


@pytest.mark.slow
def test_cpu_smoke_job_completes_with_outputs_and_metrics(uninterrupted, tiny_prepared):
    job, out = uninterrupted, uninterrupted.out
    log = job.text()
    assert "training step ended with exit status 0" in log
    assert "2 process(es) on cpu" in log, "the run did not use 2 torchrun processes"
    assert "--rdzv_backend c10d" in log and "--resume" in log
    assert uninterrupted.fields.get("Restarts") == "0"
    assert (out / "logs" / "rank0.log").is_file() and (out / "logs" / "rank1.log").is_file()
    manifest = json.loads((Path(tiny_prepared) / "manifest.json").read_text())
    num_db, num_query = manifest["num_database"], manifest["num_query"]
    shapes = {("original", "database"): (manifest["num_original"], 8), ("incremental", "database"): (num_db, 8),
              ("original", "query"): (num_query, 8), ("incremental", "query"): (num_query, 8)}
    for key, array in codes(out).items():
        assert array.shape == shapes[key], (key, array.shape)
        assert set(np.unique(array)) <= {-1, 1}, key
        assert (out / key[0] / "result.json").is_file()
    # stage 2 keeps the original codes bit for bit
    assert np.array_equal(codes(out)[("incremental", "database")][:manifest["num_original"]],
                          codes(out)[("original", "database")])
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {row["stage"]: row for row in metrics["rows"]}
    assert set(rows) == set(STAGES)
    for row in rows.values():
        assert 0.0 < row["map_all"] <= 1.0 and row["num_queries"] == num_query
    assert len(metrics["stages"]["original"]["iterations"]) == MAX_ITER
    print(f"\ncpu_smoke.sbatch: submit to COMPLETED {job.elapsed_s:.1f} s (Slurm RunTime {job.fields.get('RunTime')}); "
          f"stage train times " + ", ".join(f"{s} {metrics['stages'][s]['train_time_s']:.1f} s" for s in STAGES))


def assert_second_attempt_resumes_to_the_same_codes(job, uninterrupted):
    """After a requeue: nothing of the first attempt still runs; the second one resumes and ends with the
    uninterrupted run's codes."""
    leftover = worker_processes(job.out)
    assert not leftover, f"training processes {leftover} outlived the requeued attempt"
    job.release()
    fields = job.wait_done(timeout_s=300)
    assert fields.get("Restarts") == "1"
    assert_resumed(job)
    assert_same_codes(job.out, uninterrupted.out)


@pytest.mark.slow
def test_requeued_job_resumes_to_the_same_codes(cluster, uninterrupted, tiny_prepared, tmp_path):
    job = Job(cluster, tiny_prepared, tmp_path / "run", tmp_path)
    job.wait_for_checkpoint()
    cluster.run(["scontrol", "requeue", job.id])
    job.wait_requeued()
    assert_second_attempt_resumes_to_the_same_codes(job, uninterrupted)


@pytest.mark.slow
def test_usr1_to_the_batch_shell_checkpoints_requeues_and_completes(cluster, uninterrupted, tiny_prepared, tmp_path):
    job = Job(cluster, tiny_prepared, tmp_path / "run", tmp_path)
    checkpoint = job.wait_for_checkpoint()
    # What --signal=B:USR1@120 does 120 s before the time limit: SIGUSR1 to the batch shell only.
    cluster.run(["scancel", "--signal=USR1", "--batch", job.id])
    job.wait_requeued()
    log = job.text()
    for expected in ("SIGUSR1: time limit or preemption ahead", "scancel --signal=TERM", "+ scontrol requeue",
                     f"job {job.id} requeued"):
        if expected not in log:
            job.fail(f"the log lacks {expected!r}")
    # The stop went through torchrun's agent (which stops its workers), not a kill of the agent.
    if not re.search(r"Received .*(15|SIGTERM).* death signal", log):
        job.fail("torchrun's agent did not receive SIGTERM")
    assert checkpoint.exists(), "the checkpoint vanished"
    assert_second_attempt_resumes_to_the_same_codes(job, uninterrupted)


def test_a_slurm_that_cannot_start_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: the Slurm tests must run in CI"):
        slurm_missing("slurm-wlm cannot be installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        slurm_missing("slurm-wlm cannot be installed")


def test_the_step_asks_for_the_nodes_gpus_only_when_the_job_has_them():
    """srun gets --gpus-per-node with the GPUs the job has on the node (SLURM_GPUS_ON_NODE), and no GPU
    option at all for a CPU job (the CPU smoke test's path)."""
    def step_gpus(**env):
        run_env = {k: v for k, v in os.environ.items() if k != "SLURM_GPUS_ON_NODE"}
        return subprocess.run(["bash", "-c", f'source "{COMMON}" && dihn_step_gpus'], env={**run_env, **env},
                               capture_output=True, text=True, check=True).stdout.strip()
    assert step_gpus(SLURM_GPUS_ON_NODE="4") == "--gpus-per-node=4"
    assert step_gpus() == "" and step_gpus(SLURM_GPUS_ON_NODE="0") == ""
    assert 'gpus="$(dihn_step_gpus)"' in COMMON.read_text()
