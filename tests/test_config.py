"""The trainer's configuration: each flag is declared once, as a Config field, and the command line, the
config-file keys, the checks and the resume invariants all come from that declaration."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from dihn_dist.training import config as cfg
from dihn_dist.training.config import RESUME_INVARIANTS, Config, build_parser, parse_config

REPO = Path(__file__).resolve().parents[1]

# The demo's flags before launch/demo.sh passed launch/demo.yaml instead.
DEMO_FLAGS = ["--arch", "small-cnn", "--code-length", "12", "--max-iter", "20", "--max-epoch", "3",
              "--num-samples", "2000", "--batch-size", "64", "--lr", "1e-3", "--eval-every", "2",
              "--stage", "original,incremental,retrain"]


def option_actions():
    """dest -> the argparse actions that set it (every option but --help and --config)."""
    actions = {}
    for action in build_parser()._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            actions.setdefault(action.dest, []).append(action)
    return actions


def test_every_field_is_declared_once_and_yields_one_flag_with_help_and_default():
    actions = option_actions()
    names = [f.name for f in dataclasses.fields(Config)]
    assert sorted(actions) == sorted(names)  # no flag without a field, no field without a flag
    for item in dataclasses.fields(Config):
        assert isinstance(item.metadata.get("option"), cfg.Option), f"{item.name} is not declared by option()"
        assert item.metadata["option"].help.strip(), item.name
        [action] = actions[item.name]  # exactly one flag per field
        assert action.option_strings == [cfg.flag(item.name)]
        assert action.help and "(default: " in action.help, item.name
    help_text = build_parser().format_help()
    for name in names:
        assert cfg.flag(name) in help_text
    assert "(default: None)" not in help_text


def test_help_states_the_real_defaults_and_the_reference_flag_names():
    actions = {name: action for name, [action] in option_actions().items()}
    assert actions["batch_size"].help.endswith("(default: 64)")
    assert actions["lr"].help.endswith("(default: 0.0001)")
    assert actions["stage"].help.endswith("(default: original,incremental)")
    assert actions["topk"].help.endswith("(default: all)")
    assert actions["soft_similarity"].option_strings == ["--hard-similarity"]
    assert actions["arch"].choices == ("alexnet", "resnet50", "small-cnn", "efficientnet-lite0",
                                       "efficientnet-lite1", "efficientnet-lite2")
    assert actions["pretrained"].help.endswith("(default: auto)")


def test_defaults_come_from_the_declarations():
    config = parse_config([])
    for item in dataclasses.fields(Config):
        if item.name != "data":  # derived: data/<dataset>
            assert getattr(config, item.name) == cfg.default_of(item.name), item.name
    assert (config.data, config.augment) == ("data/fashion-mnist", "auto")  # auto: resolved with the data
    assert Config.precision_k == 1000  # evaluate.py reads the class default


def test_resume_invariants_are_derived_from_the_declarations():
    declared = tuple(f.name for f in dataclasses.fields(Config) if f.metadata["option"].resume_keeps)
    assert RESUME_INVARIANTS == declared
    assert set(RESUME_INVARIANTS) == {
        "batch_size", "lr", "weight_decay", "code_length", "max_iter", "max_epoch", "num_samples", "gamma", "mu",
        "lr_decay_original", "lr_decay_incremental", "soft_similarity", "seed", "arch", "pretrained", "resolution",
        "augment", "old_run", "old_stage", "old_codes", "precision", "grad_compression", "backbone_lr_scale",
        "freeze_backbone"}


def test_config_is_not_changed_after_parsing():
    config = parse_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_workers = 3
    assert config.num_workers is None and config.loader_threads >= 1  # resolved where it is used
    assert parse_config(["--num-workers", "3"]).loader_threads == 3


def test_reference_flag_forms():
    assert parse_config(["--hard-similarity"]).soft_similarity is False
    assert parse_config([]).soft_similarity is True
    assert parse_config(["--topk", "0"]).topk is None and parse_config(["--topk", "-5"]).topk is None
    assert parse_config(["--topk", "100"]).topk == 100
    assert parse_config(["--stage", "retrain,all"]).stage == ["original", "incremental", "retrain"]


@pytest.mark.parametrize("flag, text, key, value, expected", [
    ("--max-iter", "0", "max_iter", 0, "--max-iter: expected a positive number, got 0"),
    ("--lr", "-1", "lr", -1, "--lr: expected a positive value, got -1.0"),
    ("--mu", "-0.5", "mu", -0.5, "--mu: expected 0 or more, got -0.5"),
    ("--num-workers", "0", "num-workers", 0, "--num-workers: expected a positive number, got 0"),
])
def test_a_range_violation_gives_the_same_error_from_the_command_line_and_a_file(tmp_path, flag, text, key,
                                                                                    value, expected):
    with pytest.raises(ValueError) as from_flag:
        parse_config([flag, text])
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ValueError) as from_file:
        parse_config(["--config", str(path)])
    assert str(from_flag.value) == str(from_file.value) == expected


def test_a_range_violation_is_one_error_line_from_the_trainer(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"batch-size": 0}')
    lines = []
    for args in (["--batch-size", "0"], ["--config", str(path)]):
        result = subprocess.run([sys.executable, "-m", "dihn_dist.train", "--out", str(tmp_path / "run"), *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2
        lines.append([line for line in result.stderr.splitlines() if line.strip()])
    assert lines[0] == lines[1] == ["error: --batch-size: expected a positive number, got 0"]
    assert not (tmp_path / "run").exists()


def test_choices_are_declared_once_for_the_command_line_and_files(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse's usage error, as before
        parse_config(["--old-stage", "last"])
    assert "--old-stage: invalid choice: 'last'" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("old_stage: last\n")
    with pytest.raises(ValueError, match="^--old-stage: expected one of original, incremental, retrain, got 'last'$"):
        parse_config(["--config", str(path)])


def test_command_line_overrides_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max-iter: 0\ncode_length: 24\n")
    config = parse_config(["--config", str(path), "--max-iter", "5"])  # the file's bad value is overridden
    assert (config.max_iter, config.code_length) == (5, 24)


def test_demo_config_file_parses_into_the_demos_former_flags():
    common = ["--data", "data/fashion-mnist", "--out", "runs/demo", "--resume"]
    from_file = parse_config(["--config", str(REPO / "launch" / "demo.yaml"), *common])
    assert from_file == parse_config([*DEMO_FLAGS, *common])
    assert (from_file.lr, from_file.max_iter, from_file.augment) == (1e-3, 20, "auto")
    # extra arguments of demo.sh still override the file
    assert parse_config(["--config", str(REPO / "launch" / "demo.yaml"), "--seed", "2", "--max-iter", "3"]) == \
        parse_config([*DEMO_FLAGS, "--seed", "2", "--max-iter", "3"])
    assert 'DIHN_DEMO_CONFIG:-$REPO_ROOT/launch/demo.yaml' in (REPO / "launch" / "demo.sh").read_text()


@pytest.mark.parametrize("demo, plan", [
    ("demo", ["small-cnn at 28 px", "weights: from scratch"]),
    ("demo_pretrained", ["efficientnet-lite0 at 64 px", "efficientnet-lite0-57934424.pth (sha256 579344248a93e230"]),
])
def test_each_demo_config_passes_the_trainers_checks(demo, plan, tiny_prepared, tmp_path):
    """The demos' settings, as their scripts pass them, get through every input check of the trainer (the
    pretrained demo's weights resolve from the installed package); only the sample size is cut to the
    tiny database's."""
    script = (REPO / "launch" / f"{demo}.sh").read_text()
    assert demo == "demo" or f'DIHN_DEMO_CONFIG="$here/{demo}.yaml"' in script
    done = subprocess.run([sys.executable, "-m", "dihn_dist.train", "--config", str(REPO / "launch" / f"{demo}.yaml"),
                           "--data", str(tiny_prepared), "--out", str(tmp_path / "run"), "--resume",
                           "--num-samples", "120", "--check-only"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for expected in ["stage original:", "stage incremental:", "stage retrain:", *plan]:
        assert expected in done.stdout, (expected, done.stdout)


def test_debug_defaults_are_settings():
    assert set(cfg.DEBUG_DEFAULTS) <= {f.name for f in dataclasses.fields(Config)}
    assert parse_config(["--debug"]).max_iter == 2
